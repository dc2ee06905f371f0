"""Classify images with a trained model: the site loader's reading and normalisation, then class probabilities.

Each image goes through :func:`medflare.classification.loaders.read_image` (the loader's own code: read, channels,
resize to the recorded ``spatial_size``, per-image z-score; DICOM pixels in HU clipped to a window when one is
given), then the model; the result is one row per image with the probability of every class and the predicted
class (and the known label, when the input gives one).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from ...classification.loaders import read_image
from ...classification.training import balanced_accuracy
from ..trained_model import TrainedModel
from .inputs import Case


class Classifier:
    """Applies a trained classification model to images.

    Args:
        model: the trained model (its record gives the network and the preprocessing).
        device: where to run the network.
        window: ``[center, width]`` in HU for DICOM images (as an RSNA-style site source sets it); ``None`` keeps
            the stored values.
        class_names: names of the classes (default: ``"0"``, ``"1"``...).
    """

    def __init__(self, model: TrainedModel, device: torch.device, window: Optional[Sequence[float]] = None,
                 class_names: Optional[Sequence[str]] = None) -> None:
        if model.task != "classification":
            raise ValueError(f"{model.source} holds a {model.task} model; use the segmentation tool")
        pre = model.preprocessing
        self.in_channels, self.spatial_size = int(pre["in_channels"]), tuple(pre["spatial_size"])
        self.num_classes = int(pre["num_classes"])
        self.class_names = list(class_names) if class_names else [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names {self.class_names} for a model of "
                             f"{self.num_classes} classes")
        self.window = window
        self.device = device
        self.network = model.network.to(device).eval()

    def read(self, case: Case) -> np.ndarray:
        """The preprocessed image ``(C, H, W)``; DICOM files get the window (others never do)."""
        is_dicom = not case.image.lower().endswith((".png", ".jpg", ".jpeg", ".nii", ".nii.gz"))
        return read_image(case.image, self.in_channels, self.spatial_size, self.window if is_dicom else None)

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax probabilities ``(N, num_classes)`` of preprocessed images ``(N, C, H, W)``."""
        logits = self.network(torch.as_tensor(images).to(self.device))
        return torch.softmax(logits, dim=1).cpu().numpy()

    def rows(self, cases: Sequence[Case], batch_size: int = 32,
             on_batch: Optional[Callable[[int, int], None]] = None) -> List[Dict[str, Any]]:
        """One row per case: ``image``, ``p_<class>`` for every class, ``predicted`` (and ``label`` when known);
        ``on_batch(done, total)`` is called after each batch."""
        rows: List[Dict[str, Any]] = []
        for start in range(0, len(cases), batch_size):
            batch = cases[start:start + batch_size]
            probs = self.probabilities(np.stack([self.read(c) for c in batch]))
            for case, p in zip(batch, probs):
                row = {"image": case.image, **{f"p_{n}": float(v) for n, v in zip(self.class_names, p)},
                       "predicted": self.class_names[int(np.argmax(p))]}
                if case.label is not None:
                    row["label"] = self.class_names[int(case.label)] if case.label.isdigit() else case.label
                rows.append(row)
            if on_batch is not None:
                on_batch(min(start + batch_size, len(cases)), len(cases))
        return rows


def accuracy(rows: Sequence[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """Accuracy and balanced accuracy over the rows that have a label (``None`` when none has)."""
    labelled = [r for r in rows if "label" in r]
    if not labelled:
        return None
    labels = [r["label"] for r in labelled]
    predicted = [r["predicted"] for r in labelled]
    correct = np.array([p == y for p, y in zip(predicted, labels)])
    return {"n": len(labelled), "accuracy": float(correct.mean()),
            "balanced_accuracy": balanced_accuracy(labels, predicted)}
