"""FLARE Executor for FedDA: segmentation training with adversarial feature alignment."""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext

from ..alignment import AdversarialSegmentationTrainer, adversarial_weight
from ..workflows import PEER_SITE_KEY
from .segmentation import SegmentationExecutor


class AdversarialAlignmentExecutor(SegmentationExecutor):
    """:class:`SegmentationExecutor` whose local training adds adversarial alignment of encoder features.

    The alignment target follows what the server sends: a plain global model means FedDA-joint (target = the
    received global encoder applied to the local batch); a ``{"global", "peer_encoder"}`` collection from
    :class:`~medflare.workflows.RingRelayScatterAndGather` means FedDA-cyclic (target = the peer's encoder of the
    previous round). The discriminator stays at the site and is kept across rounds and worker restarts; only the
    segmentation model's weights are sent back.

    Args:
        adv_weight: weight of the encoder's fooling loss after warm-up.
        warmup_rounds: rounds over which the weight ramps linearly from 0.
        disc_lr: discriminator learning rate (Adam, betas 0.9/0.99).
        disc_hidden: discriminator hidden channels.
        **kwargs: :class:`SegmentationExecutor` arguments.
    """

    def __init__(self, adv_weight: float = 0.01, warmup_rounds: int = 2, disc_lr: float = 1e-4,
                 disc_hidden: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adv_weight, self.warmup_rounds = adv_weight, warmup_rounds
        self.disc_lr, self.disc_hidden = disc_lr, disc_hidden
        self._peer: Optional[Tuple[str, Dict[str, Any]]] = None

    def create_trainer(self, model: torch.nn.Module, device: torch.device) -> AdversarialSegmentationTrainer:
        return AdversarialSegmentationTrainer(model, device, adv_weight=self.adv_weight, disc_lr=self.disc_lr,
                                              disc_hidden=self.disc_hidden, **self.trainer_args())

    def unpack_train_data(self, dxo: DXO) -> Dict[str, Any]:
        self._peer = None
        if dxo.data_kind == DataKind.COLLECTION:
            peer = dxo.get_meta_prop(PEER_SITE_KEY, "?")
            self._peer = (peer, dxo.data["peer_encoder"].data)
            return super().unpack_train_data(dxo.data["global"])
        return super().unpack_train_data(dxo)

    def prepare_round(self, dxo: DXO, round_num: int, fl_ctx: FLContext) -> None:
        if self._peer is not None:
            source, weights = self._peer[0], self._peer[1]
        else:
            source, weights = "the global model", self.model.state_dict()
        self.trainer.set_target({k: torch.as_tensor(v) for k, v in weights.items()})
        self.trainer.current_weight = adversarial_weight(round_num, self.adv_weight, self.warmup_rounds)
        self.log_info(fl_ctx, f"round {round_num}: aligning encoder features to the encoder of {source} "
                              f"(adversarial weight {self.trainer.current_weight:.4g})")

    def extra_state(self) -> Dict[str, Any]:
        return self.trainer.state_dict()

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if state:
            self.trainer.load_state_dict(state)
