"""Local training of a segmentation model (plain PyTorch; no FLARE in this module).

:class:`SegmentationTrainer` runs E epochs of DiceCE training with an optional FedProx proximal term. Algorithms
that change the local objective (for example adversarial feature alignment) subclass it and override
:meth:`SegmentationTrainer.training_step`, reusing :meth:`SegmentationTrainer.optimise` for the common part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Mapping, Optional

import torch
from monai.losses import DiceCELoss
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .augment import make_intensity_augmentation
from ..data.placement import loader_options


def fedprox_term(model: nn.Module, global_params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``0.5 * ||w - w_global||^2`` over the model's trainable parameters (multiply by mu outside)."""
    total = None
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        diff = torch.sum((param - global_params[name].to(param.device)) ** 2)
        total = diff if total is None else total + diff
    return 0.5 * total


@dataclass
class TrainResult:
    """Summary of one call to :meth:`SegmentationTrainer.fit`."""

    steps: int = 0
    epochs: int = 0
    aborted: bool = False
    losses: Dict[str, float] = field(default_factory=dict)  # mean of each loss term over the last epoch


OPTIMIZERS = ("adam", "sgd")
# defaults of the segmentation jobs, chosen by the sweep in docs/training.md: SGD with momentum 0.9 drifts less
# between sites than Adam, whose per-weight step sizes move every weight by about lr per step
DEFAULT_OPTIMIZER = "sgd"
DEFAULT_LR = 0.03
LR_SCHEDULES = ("constant", "cosine")


def round_lr(base_lr: float, schedule: str, round_num: int, num_rounds: int, floor: float = 0.1) -> float:
    """Learning rate of round ``round_num`` (0-based) of ``num_rounds``.

    ``"constant"`` keeps ``base_lr``; ``"cosine"`` decays it from ``base_lr`` in round 0 to ``floor * base_lr`` in
    the last round along a half cosine, so late rounds take small local steps and the global model settles.
    """
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if num_rounds <= 1:
        return base_lr
    progress = min(max(round_num / (num_rounds - 1), 0.0), 1.0)
    return base_lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float = 0.0,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """``"adam"`` (Adam) or ``"sgd"`` (SGD with ``momentum``)."""
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


class SegmentationTrainer:
    """DiceCE training of a segmentation model with an optional FedProx term.

    Args:
        model: network returning logits ``(B, num_classes, *spatial)``.
        device: training device.
        lr: learning rate.
        fedprox_mu: weight mu of the proximal term ``mu/2 * ||w - w_global||^2`` (0 disables it: FedAvg).
        weight_decay: weight decay.
        optimizer: ``"adam"`` or ``"sgd"`` (with momentum 0.9).
        reset_optimizer: start every round (every call of :meth:`fit`) with a fresh optimiser, so no moment
            estimates from the site's previous round act on the newly received global model. ``False`` keeps the
            optimiser's state across rounds.
        mixed_precision: run the training steps' forward passes under bfloat16 autocast (weights, gradients and
            optimiser state stay float32; bfloat16 needs no loss scaling). Meant for GPUs with bfloat16 (Ampere and
            later); it also runs, slowly, on a CPU.
        intensity_augmentation: ``"none"`` or ``"gin"``: random intensity non-linearities applied to training
            batches (:mod:`medflare.segmentation.augment`), seeded by each :meth:`fit` call's seed.
        augmentation_prob: fraction of training batches that are augmented.
    """

    def __init__(self, model: nn.Module, device: torch.device, lr: float = 3e-3, fedprox_mu: float = 0.0,
                 weight_decay: float = 0.0, optimizer: str = "adam", reset_optimizer: bool = True,
                 mixed_precision: bool = False, intensity_augmentation: str = "none",
                 augmentation_prob: float = 0.5) -> None:
        if fedprox_mu < 0:
            raise ValueError(f"fedprox_mu must be >= 0, got {fedprox_mu}")
        self.model = model.to(device)
        self.device = device
        self.fedprox_mu = fedprox_mu
        self.lr, self.weight_decay, self.optimizer_name = lr, weight_decay, optimizer
        self.reset_optimizer = reset_optimizer
        self.mixed_precision = mixed_precision
        make_intensity_augmentation(intensity_augmentation)  # checks the name now, not in round 0
        self.intensity_augmentation, self.augmentation_prob = intensity_augmentation, augmentation_prob
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
        self.optimizer = self.new_optimizer()
        self._global_params: Optional[Dict[str, torch.Tensor]] = None

    def new_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimiser over the model's parameters."""
        return make_optimizer(self.model.parameters(), self.optimizer_name, self.lr, self.weight_decay)

    # ------------------------------------------------------------------ hooks for subclasses
    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        """One optimisation step on a batch; returns the loss terms as floats."""
        logits = self.model(images)
        return self.optimise({"seg": self.loss_fn(logits, labels)})

    def optimise(self, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
        """Add the FedProx term, back-propagate the sum of ``terms`` and step the model's optimiser."""
        if self.fedprox_mu > 0 and self._global_params is not None:
            terms["prox"] = self.fedprox_mu * fedprox_term(self.model, self._global_params)
        total = sum(terms.values())
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite training loss: { {k: float(v) for k, v in terms.items()} }")
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.before_step()
        self.optimizer.step()
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(total.detach())
        return out

    def before_step(self) -> None:
        """Called between back-propagation and the optimiser step (e.g. to hold some layers still)."""

    def set_lr(self, lr: float) -> None:
        """Learning rate of the following steps (and of any optimiser created later)."""
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def start_round(self) -> None:
        """Called after the global weights are loaded and before the first step of a round."""
        if self.reset_optimizer:
            self.optimizer = self.new_optimizer()
        if self.fedprox_mu > 0:
            self._global_params = {k: v.detach().clone() for k, v in self.model.named_parameters()}

    # ------------------------------------------------------------------ the loop
    def fit(self, dataset: Dataset, epochs: int, batch_size: int, seed: int = 0,
            should_stop: Callable[[], bool] = lambda: False,
            on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
        """Train for ``epochs`` passes over ``dataset`` (shuffled with ``seed``); stops early if ``should_stop()``."""
        self.start_round()
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False,
                            **loader_options(dataset, self.device))
        self.model.train()
        augment = make_intensity_augmentation(self.intensity_augmentation, seed + 7919, self.augmentation_prob)

        def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
            images = batch["image"].to(self.device, non_blocking=True)
            labels = batch["label"].to(self.device, non_blocking=True)
            if augment is not None:
                images = augment(images)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.mixed_precision):
                return self.training_step(images, labels)

        return run_epochs(loader, step, epochs, should_stop, on_epoch_end)


def run_epochs(loader: Iterable[Dict[str, torch.Tensor]], step: Callable[[Dict[str, torch.Tensor]], Dict[str, float]],
               epochs: int, should_stop: Callable[[], bool] = lambda: False,
               on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
    """Call ``step(batch)`` for every batch of ``epochs`` passes over ``loader``, averaging the loss terms it
    returns per epoch; stops before the next batch once ``should_stop()`` is true."""
    result = TrainResult()
    for epoch in range(epochs):
        sums: Dict[str, float] = {}
        batches = 0
        for batch in loader:
            if should_stop():
                result.aborted = True
                return result
            for k, v in step(batch).items():
                sums[k] = sums.get(k, 0.0) + v
            batches += 1
            result.steps += 1
        result.epochs = epoch + 1
        result.losses = {k: v / max(batches, 1) for k, v in sums.items()}
        if on_epoch_end is not None:
            on_epoch_end(epoch, result.losses)
    return result
