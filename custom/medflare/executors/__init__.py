"""FLARE Executors (client side)."""

from .segmentation import SegmentationExecutor

__all__ = ["SegmentationExecutor"]
