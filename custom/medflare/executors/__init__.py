"""FLARE Executors (client side)."""

from .alignment import AdversarialAlignmentExecutor
from .segmentation import SegmentationExecutor

__all__ = ["AdversarialAlignmentExecutor", "SegmentationExecutor"]
from .classification import ClassificationExecutor  # noqa: E402

__all__ += ["ClassificationExecutor"]
