"""Segment images with a trained model: the site loader's preprocessing, the model, and the way back to the image.

For each case (see :mod:`medflare.artefacts.inference.inputs`):

1. the image goes through the site loader's own transforms (:func:`medflare.data.datalist.image_transforms`,
   built from the checkpoint's recorded :class:`~medflare.data.ImageSpec`): read, channel-first, check, intensity
   scaling, resize to the training ``spatial_size``;
2. the model predicts class probabilities at that size (sliding-window inference when a window size is known:
   the job's ``eval_roi_size`` or one given; needed where ``spatial_size`` is ``null`` and volumes are large);
3. MONAI's ``Invertd`` takes the probabilities back through the resize to the image's own grid, the argmax is
   the label map, and MONAI's ``SaveImage`` writes it as NIfTI with the image's affine and shape.

With a label, the case also gets Dice scores at the training resolution (the label through the loader's
:func:`~medflare.data.datalist.build_transforms`, exactly what cross-site evaluation scores) and at the image's
native resolution (the label as stored).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.transforms import Activationsd, AsDiscreted, Compose, EnsureChannelFirst, Invertd, LoadImage, SaveImage

from ...data.datalist import DataError, ImageSpec, build_transforms, image_transforms, load_checked
from ...segmentation.metrics import add_dice, class_key, dice_metric
from ..trained_model import TrainedModel
from .inputs import Case

OUTPUT_POSTFIX = "seg"


def image_spec(preprocessing: Dict[str, Any]) -> ImageSpec:
    """The :class:`ImageSpec` of a recorded segmentation preprocessing."""
    fields = ("num_classes", "spatial_dims", "spatial_size", "in_channels", "intensity", "window")
    return ImageSpec(**{k: preprocessing[k] for k in fields if k in preprocessing})


def make_inferer(roi_size: Optional[Sequence[int]], sw_batch_size: int = 4) -> Inferer:
    """Sliding-window inference over ``roi_size`` windows (overlap 0.25, as cross-site evaluation uses), or the
    whole image at once when ``roi_size`` is ``None``."""
    if roi_size:
        return SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=0.25)
    return SimpleInferer()


@dataclass
class CaseResult:
    """What segmenting one case produced.

    Attributes:
        case: the input.
        output: path of the written label map.
        shape: the image's spatial shape (that of the label map).
        seconds: wall time of the case (loading, inference, resampling, writing).
        dice: per-class and mean Dice at the training resolution (empty without a label).
        native_dice: the same at the image's native resolution.
    """

    case: Case
    output: str
    shape: Sequence[int]
    seconds: float
    dice: Dict[str, float] = field(default_factory=dict)
    native_dice: Dict[str, float] = field(default_factory=dict)


class Segmenter:
    """Applies a trained segmentation model to cases.

    Args:
        model: the trained model (its record gives the network and the preprocessing).
        device: where to run the network.
        roi_size: sliding-window size; ``None`` uses the job's ``eval_roi_size`` (and no sliding window without one).
        sw_batch_size: windows per forward pass.
    """

    def __init__(self, model: TrainedModel, device: torch.device, roi_size: Optional[Sequence[int]] = None,
                 sw_batch_size: int = 4) -> None:
        if model.task != "segmentation":
            raise ValueError(f"{model.source} holds a {model.task} model; use the classification tool")
        self.model = model
        self.spec = image_spec(model.preprocessing)
        self.class_names = model.preprocessing.get("class_names")
        self.device = device
        self.network = model.network.to(device).eval()
        self.inferer = make_inferer(roi_size or model.preprocessing.get("eval_roi_size"), sw_batch_size)
        self.preprocess = image_transforms(self.spec)
        self.postprocess = Compose([
            Activationsd(keys="pred", softmax=True),
            Invertd(keys="pred", transform=self.preprocess, orig_keys="image", nearest_interp=False,
                    to_tensor=True, device="cpu"),
            AsDiscreted(keys="pred", argmax=True),
        ])
        self.read_label = Compose([LoadImage(image_only=True), EnsureChannelFirst()])
        self.labelled = build_transforms(self.spec)
        self.metrics = {"dice": dice_metric(self.spec.num_classes), "native_dice": dice_metric(self.spec.num_classes)}

    @torch.no_grad()
    def logits(self, image: torch.Tensor, source: str) -> torch.Tensor:
        """Class logits ``(K, *spatial)`` of one preprocessed image ``(C, *spatial)``."""
        try:
            return self.inferer(image[None].to(self.device), self.network)[0]
        except RuntimeError as e:
            raise DataError(f"{source}: the model cannot take this image (preprocessed shape "
                            f"{tuple(image.shape)}): {e}") from e

    def predict(self, case: Case) -> Dict[str, Any]:
        """``{"image", "pred", "logits"}``: the preprocessed image, the label map on the image's own grid
        ``(1, *native)`` and the logits at the training resolution."""
        item = load_checked(self.preprocess, {"image": case.image})
        logits = self.logits(item["image"], case.image)
        item["logits"] = logits.cpu()
        return self.postprocess({**item, "pred": logits})

    def _score(self, name: str, pred: torch.Tensor, label: torch.Tensor) -> Dict[str, float]:
        k = self.spec.num_classes
        metric = self.metrics[name]
        add_dice(metric, pred[None], torch.as_tensor(label)[None], k)
        per_class = metric.get_buffer()[-1].cpu().numpy()
        scores = {class_key(c + 1, self.class_names): float(v) for c, v in enumerate(per_class)}
        scores["dice"] = float(np.mean(per_class))
        return scores

    def score(self, case: Case, logits: torch.Tensor, pred: torch.Tensor) -> Dict[str, Dict[str, float]]:
        """Dice of one case at the training resolution and at the native resolution."""
        labelled = load_checked(self.labelled, {"image": case.image, "label": case.label})
        native = load_checked(self.read_label, case.label)
        if tuple(native.shape[1:]) != tuple(pred.shape[1:]):
            raise DataError(f"{case.label}: label shape {tuple(native.shape[1:])} differs from the image's "
                            f"{tuple(pred.shape[1:])} ({case.image})")
        return {"dice": self._score("dice", torch.argmax(logits, dim=0, keepdim=True), labelled["label"]),
                "native_dice": self._score("native_dice", pred, native)}

    def segment(self, case: Case, out_dir: str) -> CaseResult:
        """Segment one case and write its label map into ``out_dir``."""
        start = time.time()
        out = self.predict(case)
        pred = out["pred"]
        scores = self.score(case, out["logits"], pred) if case.label else {}
        writer = SaveImage(output_dir=out_dir, output_postfix=OUTPUT_POSTFIX, output_ext=".nii.gz", resample=False,
                           separate_folder=False, output_dtype=np.uint8, print_log=False)
        writer(pred)
        path = os.path.join(out_dir, f"{case.name}_{OUTPUT_POSTFIX}.nii.gz")
        return CaseResult(case, path, tuple(pred.shape[1:]), time.time() - start, **scores)

    def summary(self) -> Dict[str, Dict[str, float]]:
        """Mean Dice over the scored cases, per class and overall, at both resolutions (MONAI's aggregate, as
        cross-site evaluation reduces it)."""
        out = {}
        for name, metric in self.metrics.items():
            buffer = metric.get_buffer()
            if buffer is not None and len(buffer):
                per_class = metric.aggregate().cpu().numpy()
                out[name] = {**{class_key(c + 1, self.class_names): float(v) for c, v in enumerate(per_class)},
                             "dice": float(np.mean(per_class))}
        return out


def check_unique_outputs(cases: Sequence[Case]) -> None:
    """Raise :class:`DataError` when two inputs would write the same output file."""
    seen: Dict[str, str] = {}
    for case in cases:
        if case.name in seen:
            raise DataError(f"{case.image} and {seen[case.name]} would both be written as "
                            f"{case.name}_{OUTPUT_POSTFIX}.nii.gz; segment them into different folders")
        seen[case.name] = case.image


def segment_cases(segmenter: Segmenter, cases: Sequence[Case], out_dir: str,
                  on_case: Optional[Callable[[int, int, CaseResult], None]] = None) -> List[CaseResult]:
    """Segment every case into ``out_dir``; ``on_case(index, total, result)`` is called after each one."""
    check_unique_outputs(cases)
    os.makedirs(out_dir, exist_ok=True)
    results = []
    for i, case in enumerate(cases):
        results.append(segmenter.segment(case, out_dir))
        if on_case is not None:
            on_case(i, len(cases), results[-1])
    return results


def dice_rows(results: Sequence[CaseResult], summary: Dict[str, Dict[str, float]]) -> List[Dict[str, Any]]:
    """One row per scored case, then a ``mean`` row: Dice per class at the training and native resolution."""
    rows = []
    for r in results:
        if r.dice:
            rows.append({"case": r.case.name, **r.dice, **{f"native_{k}": v for k, v in r.native_dice.items()}})
    if rows and summary:
        rows.append({"case": "mean", **summary["dice"],
                     **{f"native_{k}": v for k, v in summary["native_dice"].items()}})
    return rows
