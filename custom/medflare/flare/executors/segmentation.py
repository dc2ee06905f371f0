"""FLARE Executor for federated segmentation: ``train``, ``validate`` and ``submit_model``.

Per ``train`` task the site:

1. loads the received global weights,
2. evaluates them on its validation split (per-class Dice; sent back as the *initial metrics* that drive
   best-model selection) and on its test split (``test_dice``...: reported, never used to choose anything),
3. trains ``local_epochs`` epochs (DiceCE, optional FedProx term),
4. returns the new weights, the number of training samples, and a few documented scalars.

Cross-site evaluation (``validate``) scores each model it is sent on the site's test split, or on its validation
split when the site has no test list (the result then says ``on_test_split: 0``).

What leaves the site: model weights, the sample count, and the scalars listed in :data:`REPORTED_SCALARS`.
Images, labels and features never do.

State that must outlive a worker process (the last local model, optimiser state; subclasses add their own) is
kept in ``<app dir>/medflare_client_state.pt`` and reloaded when FLARE restarts the worker.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from nvflare.apis.dxo import DXO
from nvflare.apis.fl_context import FLContext

from ...data import ImageSpec, resolve_site_config
from ...segmentation.data import SiteData, load_site_data
from ...segmentation.synthetic import SyntheticSegConfig
from ...data.placement import place_on_device
from ...segmentation.metrics import evaluate_segmentation
from ...algorithms.personalization import PersonalHeadTrainer, site_private_keys
from ...segmentation.training import DEFAULT_LR, DEFAULT_OPTIMIZER, SegmentationTrainer, round_lr
from .base import SiteExecutor
from .support import load_weights, weights_to_numpy

# scalars sent with the weights, besides the Dice of the received global model (the initial metrics);
# "train_<term>" is the mean of each loss term over the last local epoch (loss, seg, prox, adv, disc, disc_acc)
REPORTED_SCALARS = ("modality", "n_train", "n_val", "n_test", "test_dice", "test_dice_<class>", "dice_local",
                    "train_seconds", "train_<term>", "domain_acc (FedDA domain mode)", "deployed_model",
                    "site_local_layers", "personal_dice, test_personal_dice (Ditto)")


def resolve_classes(synthetic: SyntheticSegConfig, num_classes: Optional[int],
                    class_names: Optional[Sequence[str]]) -> Tuple[int, list]:
    """The job's class count and names: as given, else the built-in benchmark's (see :class:`SegmentationExecutor`)."""
    benchmark = [synthetic.label_names[str(i)] for i in range(synthetic.num_classes)]
    if num_classes is None:
        num_classes = len(class_names) if class_names else len(benchmark)
    if class_names is None:
        class_names = benchmark if num_classes == len(benchmark) else \
            ["background"] + [f"class{i}" for i in range(1, num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names {list(class_names)} do not name num_classes={num_classes} classes")
    return int(num_classes), list(class_names)


class SegmentationExecutor(SiteExecutor):
    """Local training and evaluation of a segmentation model at one site.

    Args:
        model: ``{"name": "unet", **constructor kwargs}``; ``spatial_dims``, ``in_channels`` and ``out_channels``
            default to the image settings below. Must match the server persistor's ``model``.
        num_classes: label classes including background; ``null`` (default): the built-in benchmark's (3 for the
            ``blobs`` and ``ellipses`` variants, 4 for ``anatomy``). Set it for a site's own data.
        class_names: names of the classes (index 0 = background), used in metric names; ``null``: the benchmark's
            (``background, organ, lesion`` or ``background, csf, gm, wm``) when ``num_classes`` matches it, else
            ``class1``, ``class2``...
        spatial_dims: 2 or 3.
        spatial_size: size every image is resized to (``null`` keeps native sizes).
        in_channels: image channels.
        intensity: ``"minmax"``, ``"zscore"`` or ``"window"`` (see :class:`medflare.data.ImageSpec`).
        window: ``[low, high]`` for ``intensity="window"`` (e.g. a CT window in HU).
        synthetic: settings of the built-in benchmark used by sites without a data config
            (see :class:`medflare.segmentation.synthetic.SyntheticSegConfig`).
        lr: learning rate of the local optimiser.
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        reset_optimizer: start each round's local training with a fresh optimiser (``false`` keeps the moment
            estimates of the site's previous round; see ``docs/training.md`` for the sweep behind the default).
        lr_schedule: ``"constant"`` or ``"cosine"`` (decay over the job's rounds to 0.1 x ``lr``; see
            :func:`medflare.segmentation.training.round_lr`).
        local_epochs: local epochs per round.
        batch_size: training batch size.
        fedprox_mu: FedProx proximal weight (0 = FedAvg).
        seed: seed of shuffling and initialisation at this site.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        num_threads: CPU threads for torch; 0 (default): ``$MEDFLARE_NUM_THREADS`` or 1 (see
            :func:`medflare.flare.executors.base.configure_torch`).
        tb_writer_id: id of the client's ``TBWriter`` component ("" disables TensorBoard).
        eval_roi_size: sliding-window size for evaluation of large volumes (``null`` = whole image).
        send_weight_differences: send ``WEIGHT_DIFF`` results instead of ``WEIGHTS`` (for FLARE's percentile and
            SVT privacy filters; see :class:`~medflare.flare.executors.base.SiteExecutor`).
        mixed_precision: train under bfloat16 autocast (for GPUs; see
            :class:`~medflare.segmentation.training.SegmentationTrainer`). On a CUDA device a site's in-memory data is
            also kept on the device when it fits (:mod:`medflare.data.placement`).
        evaluate_local_model: report ``dice_local``, the trained local model's validation Dice (see
            :class:`~medflare.flare.executors.base.SiteExecutor`).
        local_norm: ``true``: keep every normalisation layer (affine parameters and any running statistics) at
            the site (FedBN): they are never sent, and the model the site trains, evaluates and deploys is the global
            model with the site's own normalisation layers. ``"first"``: only the first one (the layer right after
            the input convolution: a per-site input adapter of 2 x channels numbers). Needs a norm with parameters
            (``model: {"norm": ["instance", {"affine": true}]}`` or ``"batch"``).
        local_head: keep the output head, and any calibration modules of the network, at the site (FedLC, FedDP;
            see :mod:`medflare.algorithms.personalization`): never sent, restored into every received global model.
        head_steps: the first ``head_steps`` batches of each round train only the site-local layers (FedLC: 10).
        inconsistency_weight: FedDP's ``beta``: each pixel's loss is weighted by ``1 + beta * u``, ``u`` the
            disagreement between the site's prediction and that of the model it received (0: plain DiceCE).
        finetune_epochs: local fine-tuning for deployment: in the job's last round, after training and sending its
            update, the site trains the global model it received (with its own layers) alone for this many epochs
            and deploys the result as its *personal model* (kept in the client state, submitted to cross-site
            evaluation, loaded by ``--model <site>``). 0 (default): the site deploys the global model.
    """

    def __init__(self, model: Optional[Dict[str, Any]] = None, num_classes: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None, spatial_dims: int = 2,
                 spatial_size: Optional[Sequence[int]] = (64, 64), in_channels: int = 1, intensity: str = "minmax",
                 window: Optional[Sequence[float]] = None, synthetic: Optional[Dict[str, Any]] = None,
                 lr: float = DEFAULT_LR, optimizer: str = DEFAULT_OPTIMIZER, reset_optimizer: bool = True,
                 lr_schedule: str = "constant", local_epochs: int = 1, batch_size: int = 16, fedprox_mu: float = 0.0,
                 seed: int = 0, device: str = "auto", num_threads: int = 0, tb_writer_id: str = "tb_writer",
                 eval_roi_size: Optional[Sequence[int]] = None, send_weight_differences: bool = False,
                 evaluate_local_model: bool = True, mixed_precision: bool = False, local_norm: Any = False,
                 local_head: bool = False, head_steps: int = 0, inconsistency_weight: float = 0.0,
                 finetune_epochs: int = 0) -> None:
        super().__init__(tb_writer_id, send_weight_differences, evaluate_local_model)
        self.mixed_precision = mixed_precision
        self.synthetic = SyntheticSegConfig(**{"spatial_dims": spatial_dims, **(synthetic or {})})
        num_classes, class_names = resolve_classes(self.synthetic, num_classes, class_names)
        self.spec = ImageSpec(num_classes=num_classes, spatial_dims=spatial_dims,
                              spatial_size=tuple(spatial_size) if spatial_size else None, in_channels=in_channels,
                              intensity=intensity, window=tuple(window) if window else None)
        model = dict(model or {})
        self.model_name = model.pop("name", "unet")
        self.model_args = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": num_classes,
                           **model}
        self.class_names = list(class_names)
        self.lr, self.local_epochs, self.batch_size = lr, local_epochs, batch_size
        self.optimizer, self.reset_optimizer = optimizer, reset_optimizer
        round_lr(lr, lr_schedule, 0, 1)  # validates the schedule's name now, not in round 0
        self.lr_schedule = lr_schedule
        self.fedprox_mu, self.seed = fedprox_mu, seed
        self.device_name, self.num_threads = device, num_threads
        self.eval_roi_size = tuple(eval_roi_size) if eval_roi_size else None
        self.data: Optional[SiteData] = None
        self.trainer: Optional[SegmentationTrainer] = None
        if local_norm not in (False, True, "first"):
            raise ValueError(f"local_norm must be true, false or \"first\", got {local_norm!r}")
        self.local_norm = local_norm
        self.local_head = bool(local_head)
        if (head_steps or inconsistency_weight) and not self.local_head:
            raise ValueError("head_steps and inconsistency_weight train a site-local head: set local_head: true")
        self.head_steps, self.inconsistency_weight = int(head_steps), float(inconsistency_weight)
        if finetune_epochs < 0:
            raise ValueError(f"finetune_epochs must be >= 0, got {finetune_epochs}")
        self.finetune_epochs = int(finetune_epochs)
        self.personal_weights: Optional[Dict[str, Any]] = None  # the site's personal model, if it keeps one
        self._round_global: Optional[Dict[str, Any]] = None  # the received global model with the site's layers
        self._num_rounds: Optional[int] = None

    @property
    def deployed_model(self) -> str:
        """Which model the site deploys (reported, and named in the run summary): ``"global"``, the final global
        model used with the site's own layers of :meth:`local_parts`; ``"personal"``, the site's personal model."""
        return "personal" if self.keeps_personal_model else "global"

    @property
    def keeps_personal_model(self) -> bool:
        """Whether the site trains a personal model of its own (here: by fine-tuning, ``finetune_epochs``)."""
        return self.finetune_epochs > 0

    def deployed_weights(self) -> Optional[Dict[str, Any]]:
        """The personal model where the site keeps one (none before it is trained), else the last local model."""
        return self.personal_weights if self.keeps_personal_model else self.local_weights

    @property
    def rounds_done(self) -> int:
        """Rounds this site has trained in (its local model is of round ``rounds_done - 1``)."""
        return self.local_round + 1

    def local_parts(self) -> list:
        """The parts of the network this site keeps (see :data:`medflare.algorithms.personalization.PRIVATE_PARTS`)."""
        norm = {True: ["norm"], "first": ["first_norm"], False: []}[self.local_norm]
        return norm + (["head"] if self.local_head else [])

    def site_local_keys(self) -> set:
        """The entries of :meth:`local_parts`: normalisation layers (FedBN), the head (FedLC, FedDP)."""
        return site_private_keys(self.model, self.local_parts())

    # ------------------------------------------------------------------ extension points
    def create_trainer(self, model: torch.nn.Module, device: torch.device) -> SegmentationTrainer:
        """The local trainer; algorithms that change the local objective return a subclass here."""
        if self.local_head:
            return PersonalHeadTrainer(model, device, private_keys=site_private_keys(model, self.local_parts()),
                                       head_steps=self.head_steps, inconsistency_weight=self.inconsistency_weight,
                                       **self.trainer_args())
        return SegmentationTrainer(model, device, **self.trainer_args())

    def trainer_args(self) -> Dict[str, Any]:
        """Keyword arguments every trainer of this executor takes (optimiser, learning rate, FedProx)."""
        return {"lr": self.lr, "fedprox_mu": self.fedprox_mu, "optimizer": self.optimizer,
                "reset_optimizer": self.reset_optimizer, "mixed_precision": self.mixed_precision}

    # ------------------------------------------------------------------ template hooks
    def load_data(self, fl_ctx: FLContext) -> None:
        config = resolve_site_config(self.site, self._local_dir, self.synthetic.modalities)
        start = time.time()
        self.data = load_site_data(config, self.spec, self.synthetic)
        n_test = len(self.data.test) if self.data.test is not None else 0
        self.log_info(fl_ctx, f"site '{self.site}' data from {config.source}: {len(self.data.train)} training, "
                              f"{len(self.data.val)} validation and {n_test} test images "
                              f"(modality {self.data.modality or 'n/a'}, datalist {self.data.datalist}) loaded in "
                              f"{time.time() - start:.1f}s")
        for note in ([self.data.test_note] if self.data.test_note else []) + self.data.warnings:
            self.log_warning(fl_ctx, note)

    def place_data(self, device: torch.device, fl_ctx: FLContext) -> None:
        placed = []
        for split in ("train", "val", "test"):
            dataset = getattr(self.data, split)
            setattr(self.data, split, place_on_device(dataset, device))
            if getattr(self.data, split) is not dataset:
                placed.append(split)
        if placed:
            self.log_info(fl_ctx, f"site '{self.site}' keeps its {', '.join(placed)} data on {device}")

    state_keys = SiteExecutor.state_keys + ("rounds_done",)

    def state_dict(self) -> Dict[str, Any]:
        """Adds the rounds done and, where the site keeps one, its personal model."""
        personal = {} if self.personal_weights is None else {
            "personal_weights": {k: torch.as_tensor(v) for k, v in self.personal_weights.items()}}
        return {**super().state_dict(), "rounds_done": self.rounds_done, **personal}

    def load_state(self, state: Dict[str, Any]) -> str:
        super().load_state(state)
        if "personal_weights" in state:
            self.personal_weights = {k: v.cpu().numpy() for k, v in state["personal_weights"].items()}
        self.local_round = int(state["rounds_done"]) - 1
        return f"after {self.rounds_done} rounds"

    def _validation_metrics(self) -> Dict[str, float]:
        """Cross-site evaluation: the test split (validation when the site has none, flagged)."""
        on_test = self.data.test is not None
        return {**self.evaluate("test" if on_test else "val"), "on_test_split": float(on_test)}

    def evaluate(self, split: str = "val", model: Optional[torch.nn.Module] = None) -> Dict[str, float]:
        """Metrics of ``model`` (default: the current model) on this site's ``"val"`` or ``"test"`` split."""
        dataset = {"val": self.data.val, "test": self.data.test}[split]
        return evaluate_segmentation(model or self.model, dataset, self.spec.num_classes, self.device,
                                     batch_size=self.batch_size, class_names=self.class_names,
                                     roi_size=self.eval_roi_size)

    def test_metrics(self) -> Dict[str, float]:
        """``test_``-prefixed metrics of the current model on the test split (empty without one)."""
        if self.data.test is None:
            return {}
        metrics = self.evaluate("test")
        return {"n_test": metrics.pop("n_images"), **{f"test_{k}": v for k, v in metrics.items()}}

    def assess_global_model(self, dxo: DXO, global_weights: Dict[str, Any], round_num: int,
                            num_rounds: Optional[int], fl_ctx: FLContext) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Validation Dice (model selection), and the test split's Dice (reported)."""
        global_metrics = self.evaluate()
        global_metrics.pop("n_images", None)
        received = self.test_metrics()
        self.log_info(fl_ctx, f"round {round_num}/{num_rounds}: global model dice on '{self.site}' = "
                              f"{global_metrics['dice']:.4f} (validation)"
                      + (f", {received['test_dice']:.4f} (test)" if "test_dice" in received else ""))
        return global_metrics, received

    def before_training(self, dxo: DXO, round_num: int, num_rounds: Optional[int], fl_ctx: FLContext) -> None:
        """The round's learning rate; keeps the received model where the site fine-tunes it later."""
        self._num_rounds = num_rounds if isinstance(num_rounds, int) else None
        if self._num_rounds is not None:
            self.trainer.set_lr(round_lr(self.lr, self.lr_schedule, round_num, num_rounds))
        if self.keeps_personal_model:
            self._round_global = weights_to_numpy(self.model)

    def after_training(self, round_num: int, fl_ctx: FLContext) -> Dict[str, Any]:
        """In the job's last round (``finetune_epochs``): fine-tune the received global model into the personal
        model; report its Dice."""
        if not self.finetune_epochs or self._num_rounds is None or round_num != self._num_rounds - 1:
            return {}
        load_weights(self.model, self._round_global, f"global model of round {round_num}")
        for epoch in range(self.finetune_epochs):  # one call per epoch, seeded as benchmarks/bare_loop.py does
            self.trainer.fit(self.data.train, 1, self.batch_size, seed=self.seed * 1000 + self._num_rounds + epoch)
        self.personal_weights = weights_to_numpy(self.model)
        self.log_info(fl_ctx, f"round {round_num}: fine-tuned the global model for {self.finetune_epochs} epochs "
                              "into this site's personal model")
        return self.personal_report(self.model)

    def personal_report(self, model: torch.nn.Module) -> Dict[str, float]:
        """``personal_dice`` and ``test_personal_dice``: the personal model's validation and test Dice."""
        report = {"personal_dice": self.evaluate("val", model)["dice"]}
        if self.data.test is not None:
            report["test_personal_dice"] = self.evaluate("test", model)["dice"]
        return report

    def local_metrics(self) -> Dict[str, float]:
        return self.evaluate()

    def trained_report(self, report: Dict[str, Any], local_metrics: Dict[str, float], losses: Dict[str, float],
                       seconds: float) -> Dict[str, Any]:
        return {"modality": self.data.modality or "", "n_train": len(self.data.train), "n_val": len(self.data.val),
                "deployed_model": self.deployed_model, "site_local_layers": "+".join(self.local_parts()),
                **report, **({"dice_local": local_metrics["dice"]} if local_metrics else {}),
                "train_seconds": round(seconds, 2),
                **{f"train_{k}": v for k, v in losses.items()}}
