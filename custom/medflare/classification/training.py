"""Local training and evaluation of a classifier (plain PyTorch; no FLARE in this module).

- :func:`classification_metrics` / :func:`evaluate_classifier`: accuracy, balanced accuracy, macro one-vs-rest
  AUC (over the classes present in the labels; MONAI's ROC AUC, ties counted half) and mean CE.
- :func:`balanced_accuracy`: mean recall over the classes present in the labels (also used by the inference tool).
- :class:`ClassificationTrainer`: one training path for every method: logit-adjusted CE from the site's class
  counts, optimised by Adam (the baselines) or GSAM around Adam (FedISM, FedISM+), ``rho`` settable per round.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..algorithms.sam import GSAM, LogitAdjustedCE
from ..segmentation.training import TrainResult, run_epochs


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> Optional[float]:
    """Macro one-vs-rest ROC AUC (MONAI's :func:`~monai.metrics.compute_roc_auc`, ties counted half) over the classes
    present in ``labels``: those have both positives and negatives once two classes are present (None otherwise)."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return None
    one_hot = torch.as_tensor((labels[:, None] == present[None, :]).astype(np.float64))
    scores = torch.as_tensor(np.asarray(probs)[:, present])
    return float(compute_roc_auc(scores, one_hot, average="macro"))


def balanced_accuracy(labels: Sequence[Any], predicted: Sequence[Any]) -> float:
    """Mean recall over the classes present in ``labels`` (in sorted order), for labels of any comparable type
    (class indices or names); ``predicted`` holds one prediction per label."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    if labels.shape != predicted.shape or len(labels) == 0:
        raise ValueError(f"need as many predictions as labels, at least one: {labels.shape} vs {predicted.shape}")
    correct = predicted == labels
    return float(np.mean([float(correct[labels == c].mean()) for c in np.unique(labels)]))


def classification_metrics(labels: np.ndarray, logits: np.ndarray) -> Dict[str, float]:
    """``acc``, ``bacc`` (mean recall over the classes present), ``auc`` (macro OvR; omitted if undefined),
    ``loss`` (mean CE) and ``n_images``."""
    labels = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits, dtype=np.float64)
    if len(labels) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    pred = logits.argmax(axis=1)
    out = {"acc": float(np.mean(pred == labels)), "bacc": balanced_accuracy(labels, pred),
           "loss": float(-np.mean(log_probs[np.arange(len(labels)), labels])), "n_images": int(len(labels))}
    auc = macro_auc(labels, np.exp(log_probs))
    if auc is not None:
        out["auc"] = auc
    return out


@torch.no_grad()
def predict(model: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 64):
    """Logits and labels of ``dataset`` in eval mode (the model's mode is restored)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        logits.append(model(batch["image"].to(device)).float().cpu().numpy())
        labels.append(batch["label"].view(-1).numpy())
    model.train(was_training)
    if not logits:
        raise ValueError("cannot evaluate on an empty dataset")
    return np.concatenate(logits), np.concatenate(labels)


def evaluate_classifier(model: nn.Module, dataset: Dataset, device: torch.device,
                        batch_size: int = 64) -> Dict[str, float]:
    logits, labels = predict(model, dataset, device, batch_size)
    return classification_metrics(labels, logits)


class ClassificationTrainer:
    """Logit-adjusted CE training with Adam or GSAM(Adam).

    Args:
        model: the classifier.
        device: training device.
        class_counts: the site's training class counts (prior of the logit adjustment).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        optimizer: ``"adam"`` or ``"gsam"``.
        rho: GSAM perturbation radius (overridable per round with :meth:`set_rho`).
        gsam_alpha: GSAM decomposition coefficient.
        tau: logit-adjustment temperature (0 = plain CE).
        reset_optimizer: a fresh Adam (and GSAM) at every call of :meth:`fit`, i.e. every round, as the FedISM
            authors' code creates one per local round; ``False`` keeps Adam's moments across rounds.
    """

    def __init__(self, model: nn.Module, device: torch.device, class_counts: Sequence[int], lr: float = 1e-3,
                 weight_decay: float = 5e-4, optimizer: str = "adam", rho: float = 0.05, gsam_alpha: float = 0.1,
                 tau: float = 1.0, reset_optimizer: bool = False) -> None:
        if optimizer not in ("adam", "gsam"):
            raise ValueError(f"optimizer must be 'adam' or 'gsam', got {optimizer!r}")
        self.model = model.to(device)
        self.device = device
        self.kind = optimizer
        self.loss_fn = LogitAdjustedCE(class_counts, tau=tau) if tau > 0 else nn.CrossEntropyLoss()
        self.lr, self.weight_decay, self.gsam_alpha = lr, weight_decay, gsam_alpha
        self.reset_optimizer = reset_optimizer
        self._new_optimizer(rho)

    def _new_optimizer(self, rho: float) -> None:
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999),
                                          weight_decay=self.weight_decay)
        self.gsam = GSAM(self.model.parameters(), self.optimizer, rho=rho, alpha=self.gsam_alpha)

    def set_rho(self, rho: float) -> None:
        self.gsam.rho = float(rho)

    def training_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
        if self.kind == "gsam":
            loss, loss_p = self.gsam.step(self.model, lambda: self.loss_fn(self.model(images), labels))
            return {"loss": loss, "loss_perturbed": loss_p}
        loss = self.loss_fn(self.model(images), labels)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {float(loss)}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach())}

    def fit(self, dataset: Dataset, epochs: int, batch_size: int, seed: int = 0,
            should_stop: Callable[[], bool] = lambda: False,
            on_epoch_end: Optional[Callable[[int, Dict[str, float]], None]] = None) -> TrainResult:
        if self.reset_optimizer:
            self._new_optimizer(self.gsam.rho)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                            drop_last=len(dataset) > batch_size and len(dataset) % batch_size == 1)
        self.model.train()
        return run_epochs(loader, lambda batch: self.training_step(batch["image"].to(self.device),
                                                                   batch["label"].to(self.device).view(-1)),
                          epochs, should_stop, on_epoch_end)
