"""Personalised federated segmentation: the pieces of Ditto, FedLC and FedDP as plain PyTorch (no FLARE here).

Every method trains one *global* model by FedAvg and gives each site a *deployed* model of its own:

- **Ditto** (Li et al., ICML 2021): a site keeps a whole personal model ``v`` and trains it on its own data with
  ``lambda/2 * ||v - w||^2`` pulling it towards the round's global model ``w``. :class:`ProximalPersonalTrainer`
  applies the term as its proximal step after every optimiser step, ``v <- (v + lr*lambda*w) / (1 + lr*lambda)``
  (the exact minimiser of the term plus a step of size ``lr``), which is stable for any ``lambda``: ``lambda = 0``
  is local training, ``lambda -> inf`` keeps ``v`` at the global model.
- **FedLC** (Wang, Jin and Wang, ECCV 2022): the segmentation head and two calibration modules stay at the site:
  a feature calibration (a per-site channel gate on the bottleneck features: the paper's channel selection computed
  from a one-hot site embedding, which for a fixed site is one learned vector) and a prediction calibration (a
  small convolution that corrects the logits from the image and the predicted probabilities), see
  :class:`~medflare.segmentation.networks.CalibratedUNet`. The first ``head_steps`` batches of each round train only
  those site-local layers, the rest train everything, as in the paper's code.
- **FedDP** (Wang et al., TMI 2023), as far as the paper defines it for a convolutional network: *local query* is
  the per-class output layer (the convolutional counterpart of a transformer's class queries) kept at the site;
  *inconsistency-guided calibration* weights each pixel's loss by ``1 + beta * u``, where ``u`` is the
  disagreement (total-variation distance, scaled by its maximum in the batch) between the site's current
  prediction and the prediction of the model it received at the start of the round. The paper measures
  inconsistency among the sites' models; here only the federation's model stands in for them, since other sites'
  private layers never leave those sites.

Which ``state_dict`` entries stay at a site is :func:`site_private_keys`; the FLARE executors leave them out of
every result and restore them into every received global model.
"""

from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional, Set

import torch
import torch.nn.functional as F
from monai.networks import one_hot
from torch import nn

from ..segmentation.networks import head_keys, norm_layer_keys
from ..segmentation.training import SegmentationTrainer

PRIVATE_PARTS = ("norm", "first_norm", "head")
"""Parts of a segmentation network a site can keep: every normalisation layer (FedBN), the first one only, or the
output head with any calibration modules (FedLC, FedDP)."""


def site_private_keys(model: nn.Module, parts) -> Set[str]:
    """``state_dict`` keys of ``model`` that stay at the site for the given ``parts`` (see :data:`PRIVATE_PARTS`).

    Raises:
        ValueError: an unknown part, or a part the model does not have (normalisation layers without parameters).
    """
    keys: Set[str] = set()
    for part in parts:
        if part not in PRIVATE_PARTS:
            raise ValueError(f"unknown site-local part {part!r}; parts: {PRIVATE_PARTS}")
        found = head_keys(model) if part == "head" else norm_layer_keys(model, first_only=part == "first_norm")
        if not found:
            if part == "head":
                raise ValueError(f"a site-local head needs a UNet ('unet' or 'unet_calibrated'), not "
                                 f"{type(model).__name__}")
            raise ValueError("local_norm needs normalisation layers with parameters or statistics; the model has "
                             "none (use model: {\"norm\": [\"instance\", {\"affine\": true}]} or \"batch\")")
        keys |= found
    return keys


def proximal_pull(model: nn.Module, anchor: Mapping[str, torch.Tensor], step: float) -> None:
    """In place, every trainable parameter ``v <- (v + step * a) / (1 + step)``: the proximal step of
    ``lambda/2 * ||v - a||^2`` with ``step = lr * lambda`` (``step = 0`` leaves the model as it is)."""
    if step <= 0:
        return
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(anchor[name].to(param.device), alpha=step).div_(1.0 + step)


class ProximalPersonalTrainer(SegmentationTrainer):
    """Ditto's personal-model trainer: DiceCE steps, each followed by the proximal pull towards the global model
    given to :meth:`set_anchor` (see the module docstring).

    Args:
        ditto_lambda: ``lambda`` of ``lambda/2 * ||v - w||^2`` (>= 0).
        **kwargs: :class:`~medflare.segmentation.training.SegmentationTrainer` arguments (no FedProx term).
    """

    def __init__(self, model: nn.Module, device: torch.device, ditto_lambda: float = 0.1, **kwargs) -> None:
        if ditto_lambda < 0:
            raise ValueError(f"ditto_lambda must be >= 0, got {ditto_lambda}")
        super().__init__(model, device, **kwargs)
        self.ditto_lambda = ditto_lambda
        self._anchor: Optional[Dict[str, torch.Tensor]] = None

    def set_anchor(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        """The global model of this round, which the personal model is pulled towards."""
        self._anchor = {k: torch.as_tensor(v).detach().clone().to(self.device) for k, v in global_weights.items()}

    def optimise(self, terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
        if self._anchor is None:
            raise RuntimeError("set_anchor() must give the round's global model before the personal model trains")
        out = super().optimise(terms)
        proximal_pull(self.model, self._anchor, self.lr * self.ditto_lambda)
        return out


def prediction_inconsistency(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel total-variation distance between two softmax predictions, divided by its maximum over the batch
    (``(B, 1, *spatial)`` in ``[0, 1]``; all zeros when the predictions agree everywhere)."""
    tv = 0.5 * (torch.softmax(logits, 1) - torch.softmax(reference_logits, 1)).abs().sum(1, keepdim=True)
    return tv / tv.max().clamp_min(1e-8)


def weighted_dice_ce(logits: torch.Tensor, labels: torch.Tensor, pixel_weight: torch.Tensor) -> torch.Tensor:
    """Soft Dice (foreground and background, per image and class) plus cross-entropy, both weighted per pixel by
    ``pixel_weight`` ``(B, 1, *spatial)``; with weights 1 it is the unweighted DiceCE."""
    k = logits.shape[1]
    probs = torch.softmax(logits, 1)
    target = one_hot(labels, k)
    dims = tuple(range(2, logits.ndim))
    inter = (pixel_weight * probs * target).sum(dims)
    denom = (pixel_weight * (probs + target)).sum(dims)
    dice = 1.0 - ((2.0 * inter + 1e-5) / (denom + 1e-5)).mean()
    ce = (pixel_weight[:, 0] * F.cross_entropy(logits, labels[:, 0].long(), reduction="none")).mean()
    return dice + ce


class PersonalHeadTrainer(SegmentationTrainer):
    """Training with site-local layers, for FedLC and FedDP (see the module docstring).

    Args:
        private_keys: the ``state_dict`` keys that stay at the site (:func:`site_private_keys`).
        head_steps: the first ``head_steps`` batches of each round update only the private layers (FedLC: 10).
        inconsistency_weight: ``beta`` of FedDP's pixel weights ``1 + beta * u`` (0: plain DiceCE).
        **kwargs: :class:`~medflare.segmentation.training.SegmentationTrainer` arguments.
    """

    def __init__(self, model: nn.Module, device: torch.device, private_keys=(), head_steps: int = 0,
                 inconsistency_weight: float = 0.0, **kwargs) -> None:
        if head_steps < 0 or inconsistency_weight < 0:
            raise ValueError(f"head_steps and inconsistency_weight must be >= 0, got {head_steps}, "
                             f"{inconsistency_weight}")
        super().__init__(model, device, **kwargs)
        params = dict(model.named_parameters())
        self._shared_params = [p for name, p in params.items() if name not in set(private_keys)]
        self.head_steps, self.inconsistency_weight = head_steps, inconsistency_weight
        self._round_step = 0
        self._reference: Optional[nn.Module] = None

    def start_round(self) -> None:
        super().start_round()
        self._round_step = 0
        if self.inconsistency_weight > 0:  # the model as received, with the site's own layers: the reference
            self._reference = copy.deepcopy(self.model).eval()
            for p in self._reference.parameters():
                p.requires_grad_(False)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        logits = self.model(images)
        if self.inconsistency_weight > 0:
            with torch.no_grad():
                u = prediction_inconsistency(logits.detach(), self._reference(images))
            loss = weighted_dice_ce(logits, labels, 1.0 + self.inconsistency_weight * u)
        else:
            loss = self.loss_fn(logits, labels)
        return self.optimise({"seg": loss})

    def before_step(self) -> None:
        """During the round's first ``head_steps`` batches the shared layers get no gradient, so the optimiser
        leaves them as they are."""
        if self._round_step < self.head_steps:
            for p in self._shared_params:
                p.grad = None
        self._round_step += 1
