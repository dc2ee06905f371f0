"""FLARE Executors (client side)."""

from .alignment import AdversarialAlignmentExecutor
from .ditto import DittoExecutor
from .segmentation import SegmentationExecutor

__all__ = ["AdversarialAlignmentExecutor", "DittoExecutor", "SegmentationExecutor"]
from .classification import ClassificationExecutor  # noqa: E402

__all__ += ["ClassificationExecutor"]
