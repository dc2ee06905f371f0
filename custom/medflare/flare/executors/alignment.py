"""FLARE Executor for FedDA: segmentation training with adversarial feature alignment."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from ...algorithms.alignment import (AdversarialSegmentationTrainer, DomainAdversarialTrainer, adversarial_weight,
                                     domain_accuracy)
from ...data import DataError
from ...data.site_config import synthetic_site_index
from ...algorithms.feature_stats import FeatureStatistics, StatisticsAlignmentTrainer, site_feature_statistics
from ...keys import FEATURE_STATS_KEY, PEER_FEATURE_STATS_KEY, PEER_SITE_KEY
from .segmentation import SegmentationExecutor


MODES = ("domain", "target", "stats")


class AdversarialAlignmentExecutor(SegmentationExecutor):
    """:class:`SegmentationExecutor` whose local training adds adversarial alignment of encoder features.

    ``mode="target"`` (default) and ``mode="domain"`` are described below; the default is the one the 5-seed
    comparison in ``docs/fedda.md`` supports (domain mode, at weights that move the sites' features, destabilised
    training).

    ``mode="domain"``: domain-adversarial alignment among sites (see :mod:`medflare.algorithms.alignment`). The model
    must be ``unet_domain`` with one domain per site; the domain head is part of the model, so the server averages
    it like every other weight. Besides the segmentation scalars the site reports ``domain_acc``: the fraction of its
    validation images that the received head attributes to this site (1/K when the sites are aligned).

    ``mode="stats"``: alignment among sites through per-class feature statistics (see
    :mod:`medflare.algorithms.feature_stats`). At the start of a round the site measures, with the received global
    model, the per-class means and variances of its training images' bottleneck features and sends them with its weights
    (meta ``medflare_feature_stats``); :class:`~medflare.flare.workflows.StatisticsRelayScatterAndGather` hands every
    site the other sites' statistics of the previous round (meta ``medflare_peer_feature_stats``). A local site
    discriminator learns to tell the site's own feature vectors from virtual vectors drawn from the peers' Gaussians;
    the encoder learns to confuse it. The discriminator stays at the site.

    ``mode="target"``: alignment to a target encoder with a local patch discriminator, as reconstructed from the
    paper's summary. The target follows what the server sends: a plain global model means FedDA-joint (the received
    global encoder applied to the local batch); a ``{"global", "peer_encoder"}`` collection from
    :class:`~medflare.flare.workflows.RingRelayScatterAndGather` means FedDA-cyclic (the peer's encoder of the previous
    round). The discriminator stays at the site and is kept across rounds and worker restarts.

    Args:
        mode: ``"domain"`` or ``"target"``.
        adv_weight: weight of the encoder's adversarial loss after warm-up (0.01; 0.03 was the domain mode's
            setting in the comparison).
        warmup_rounds: rounds over which the weight ramps linearly from 0.
        head_lr: step size of the domain head's one gradient step per round (``mode="domain"``; see
            :class:`medflare.algorithms.alignment.DomainAdversarialTrainer`).
        domain_sites: the federation's site names in domain-head order (``mode="domain"``); ``null`` takes the index
            from names ``site-1`` ... ``site-K``.
        disc_lr: discriminator learning rate (``mode="target"``: Adam, betas 0.9/0.99; ``mode="stats"``: Adam, betas
            0.5/0.99).
        disc_hidden: discriminator hidden channels (``mode="target"``) or units (``mode="stats"``, 0: linear).
        **kwargs: :class:`SegmentationExecutor` arguments.
    """

    def __init__(self, mode: str = "target", adv_weight: float = 0.01, warmup_rounds: int = 2,
                 head_lr: float = 0.1, domain_sites: Optional[Sequence[str]] = None, disc_lr: float = 1e-4,
                 disc_hidden: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.adv_weight, self.warmup_rounds = mode, adv_weight, warmup_rounds
        self.head_lr = head_lr
        self.domain_sites = list(domain_sites) if domain_sites is not None else None
        self.disc_lr, self.disc_hidden = disc_lr, disc_hidden
        self._peer: Optional[Tuple[str, Dict[str, Any]]] = None
        self._peer_stats: Dict[str, Any] = {}
        self._own_stats: Optional[FeatureStatistics] = None

    @property
    def site_names(self) -> Sequence[str]:
        """The federation's sites in discriminator order (``domain_sites``, else ``site-1`` ... ``site-K``)."""
        if self.domain_sites is not None:
            return self.domain_sites
        return [f"site-{k + 1}" for k in range(len(self.synthetic.modalities))]

    def domain_index(self, n_domains: int) -> int:
        """This site's index in the domain head."""
        if self.domain_sites is not None:
            if len(self.domain_sites) != n_domains:
                raise DataError(f"domain_sites lists {len(self.domain_sites)} sites, the model's domain head has "
                                f"{n_domains}")
            if self.site not in self.domain_sites:
                raise DataError(f"site '{self.site}' is not in the job's domain_sites {self.domain_sites}")
            return self.domain_sites.index(self.site)
        return synthetic_site_index(self.site, n_domains)

    def create_trainer(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if self.mode == "stats":
            n_sites = len(self.site_names)
            return StatisticsAlignmentTrainer(model, device, self.domain_index(n_sites), n_sites,
                                              self.spec.num_classes, adv_weight=self.adv_weight, disc_lr=self.disc_lr,
                                              disc_hidden=self.disc_hidden, **self.trainer_args())
        if self.mode == "domain":
            if not hasattr(model, "domain_head"):
                raise ValueError("FedDA's domain mode needs the model 'unet_domain' (with n_domains = the number of "
                                 "sites) in both the executor's and the persistor's 'model' argument")
            return DomainAdversarialTrainer(model, device, self.domain_index(model.n_domains),
                                            adv_weight=self.adv_weight, head_lr=self.head_lr,
                                            **self.trainer_args())
        return AdversarialSegmentationTrainer(model, device, adv_weight=self.adv_weight, disc_lr=self.disc_lr,
                                              disc_hidden=self.disc_hidden, **self.trainer_args())

    def unpack_train_data(self, dxo: DXO) -> Dict[str, Any]:
        self._peer = None
        self._peer_stats = dict(dxo.get_meta_prop(PEER_FEATURE_STATS_KEY, None) or {})
        if dxo.data_kind == DataKind.COLLECTION:
            peer = dxo.get_meta_prop(PEER_SITE_KEY, "?")
            self._peer = (peer, dxo.data["peer_encoder"].data)
            return super().unpack_train_data(dxo.data["global"])
        return super().unpack_train_data(dxo)

    def before_training(self, dxo: DXO, round_num: int, num_rounds: Optional[int], fl_ctx: FLContext) -> None:
        """The round's adversarial weight and alignment target (peer encoder, global encoder or peer statistics)."""
        super().before_training(dxo, round_num, num_rounds, fl_ctx)
        self.trainer.current_weight = adversarial_weight(round_num, self.adv_weight, self.warmup_rounds)
        if self.mode == "stats":
            self._prepare_statistics(round_num, fl_ctx)
            return
        if self.mode == "domain":
            if self._peer is not None:
                raise ValueError("FedDA's domain mode received a ring relay payload; use mode 'target' with the "
                                 "ring relay controller")
            self.log_info(fl_ctx, f"round {round_num}: confusing the received domain head "
                                  f"(adversarial weight {self.trainer.current_weight:.4g})")
            return
        if self._peer is not None:
            source, weights = self._peer[0], self._peer[1]
        else:
            source, weights = "the global model", self.model.state_dict()
        self.trainer.set_target({k: torch.as_tensor(v) for k, v in weights.items()})
        self.log_info(fl_ctx, f"round {round_num}: aligning encoder features to the encoder of {source} "
                              f"(adversarial weight {self.trainer.current_weight:.4g})")

    def _prepare_statistics(self, round_num: int, fl_ctx: FLContext) -> None:
        """Measure this site's statistics of the received model; take the peers' statistics as the targets."""
        if self._peer is not None:
            raise ValueError("FedDA's statistics mode received a ring relay payload; use mode 'target' with the "
                             "ring relay controller")
        names = list(self.site_names)
        peers = {}
        for site, report in self._peer_stats.items():
            if site == self.site:
                continue
            if site not in names:
                raise DataError(f"feature statistics of unknown site '{site}' received; the job's sites are {names} "
                                "(set domain_sites for sites not named site-1..site-K)")
            peers[names.index(site)] = FeatureStatistics.from_report(report, f"site '{site}'")
        self.trainer.set_peer_statistics(peers)
        self._own_stats = site_feature_statistics(self.model, self.data.train, self.spec.num_classes, self.device,
                                                  batch_size=self.batch_size)
        self.log_info(fl_ctx, f"round {round_num}: aligning encoder features with the statistics of "
                              f"{sorted(self._peer_stats) or 'no site yet'} (adversarial weight "
                              f"{self.trainer.current_weight:.4g})")

    def result_meta(self) -> Dict[str, Any]:
        """The statistics mode sends this site's feature statistics of the received global model."""
        if self.mode == "stats" and self._own_stats is not None:
            return {FEATURE_STATS_KEY: self._own_stats.to_report()}
        return {}

    def assess_global_model(self, dxo: DXO, global_weights: Dict[str, Any], round_num: int,
                            num_rounds: Optional[int], fl_ctx: FLContext) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Adds ``domain_acc`` of the received model (domain mode), measured before local training."""
        global_metrics, received = super().assess_global_model(dxo, global_weights, round_num, num_rounds, fl_ctx)
        if self.mode == "domain":
            received["domain_acc"] = domain_accuracy(self.model, self.data.val, self.trainer.domain_index,
                                                     self.device)
        return global_metrics, received

    def state_dict(self) -> Dict[str, Any]:
        """Adds the discriminator and its optimiser (target and statistics modes), under ``"extra"``."""
        state = super().state_dict()
        if self.mode in ("target", "stats"):
            state["extra"] = self.trainer.state_dict()
        return state

    def load_state(self, state: Dict[str, Any]) -> str:
        restored = super().load_state(state)
        if state.get("extra") and self.mode in ("target", "stats"):
            self.trainer.load_state_dict(state["extra"])
            restored += ", discriminator"
        return restored
