"""Segmentation metrics.

- :func:`evaluate_segmentation` runs a model over a dataset and returns per-class Dice computed with MONAI's
  :class:`~monai.metrics.DiceMetric` (foreground classes only; an image where a class is absent from both prediction
  and ground truth counts as Dice 1 for that class); :func:`dice_metric` and :func:`add_dice` are that setup, also
  used by the inference tool.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from torch.utils.data import DataLoader, Dataset

from ..data.placement import loader_options


def class_key(index: int, class_names: Optional[Sequence[str]] = None) -> str:
    """Metric name of a foreground class: ``dice_<name>`` (or ``dice_<index>`` without names)."""
    if class_names and index < len(class_names):
        return f"dice_{class_names[index]}"
    return f"dice_{index}"


def dice_metric(num_classes: int) -> DiceMetric:
    """MONAI's Dice as medflare reports it everywhere: foreground classes only, per class averaged over the images
    (``mean_batch``), and an image where a class is absent from both prediction and truth scores 1 for it."""
    return DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False, num_classes=num_classes)


def add_dice(metric: DiceMetric, pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> None:
    """Add the Dice of a batch of label maps ``pred`` and ``label`` (both ``(B, 1, *spatial)``) to ``metric``."""
    metric(y_pred=one_hot(pred.long(), num_classes), y=one_hot(label.long(), num_classes))


@torch.no_grad()
def evaluate_segmentation(model: torch.nn.Module, dataset: Dataset, num_classes: int, device: torch.device,
                          batch_size: int = 16, class_names: Optional[Sequence[str]] = None,
                          roi_size: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """Mean Dice over images, per foreground class and overall.

    Args:
        model: network returning logits ``(B, num_classes, *spatial)``.
        dataset: items ``{"image": (C, *spatial), "label": (1, *spatial)}``.
        num_classes: classes including background.
        device: where to run the model.
        batch_size: evaluation batch size.
        class_names: names of all classes (index 0 = background), used in the metric keys.
        roi_size: if set, sliding-window inference with this window (large 3D volumes).

    Returns:
        ``{"dice": mean over foreground classes, "dice_<class>": ..., "n_images": N}``.
    """
    was_training = model.training
    model.eval()
    metric = dice_metric(num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, **loader_options(dataset, device))
    n = 0
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        if roi_size is not None:
            logits = sliding_window_inference(images, roi_size, batch_size, model)
        else:
            logits = model(images)
        add_dice(metric, torch.argmax(logits, dim=1, keepdim=True), labels, num_classes)
        n += images.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    per_class = metric.aggregate().cpu().numpy()
    model.train(was_training)
    result = {class_key(c + 1, class_names): float(v) for c, v in enumerate(per_class)}
    result["dice"] = float(np.mean(per_class))
    result["n_images"] = n
    return result
