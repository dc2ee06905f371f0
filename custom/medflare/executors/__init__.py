"""FLARE Executors (client side)."""

from .alignment import AdversarialAlignmentExecutor
from .segmentation import SegmentationExecutor

__all__ = ["AdversarialAlignmentExecutor", "SegmentationExecutor"]
