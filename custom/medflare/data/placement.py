"""In-memory datasets of ``{"image", "label"}`` tensors, and keeping them on a site's training device.

:class:`TensorDictDataset` is the one dataset of stacked images and labels both tasks use (the classification
benchmark's arrays, and segmentation data placed on a GPU). A dataset loaded into memory (``load_items`` with
caching, a :class:`~medflare.data.datalist.CheckedCacheDataset`) holds its ``{"image", "label"}`` tensors. On a CUDA
device that has room for it, :func:`place_on_device` stacks them once into two device tensors; batches are then drawn
on the device. Lazily loaded datasets, CPU training and data larger than the budget are left as they are (batches are
then copied with ``non_blocking`` transfers from pinned memory, see :func:`loader_options`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np

import torch
from torch.utils.data import Dataset

from .datalist import CheckedCacheDataset, item_bytes

DEVICE_BUDGET_ENV = "MEDFLARE_DEVICE_DATA_FRACTION"
DEFAULT_DEVICE_FRACTION = 0.25


class TensorDictDataset(Dataset):
    """Images ``(N, C, *spatial)`` and labels stacked in two tensors (on any device); items are
    ``{"image", "label"}`` views."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    @classmethod
    def from_arrays(cls, images: Any, labels: Any) -> "TensorDictDataset":
        """From arrays of images (stored as float32) and integer class labels (int64), held in host memory."""
        return cls(torch.as_tensor(np.asarray(images, dtype=np.float32)),
                   torch.as_tensor(np.asarray(labels, dtype=np.int64)))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


def _in_memory_items(dataset: Dataset) -> Optional[list]:
    """The items of a dataset that holds plain tensors in memory with no transform left to run (a
    :class:`~medflare.data.datalist.CheckedCacheDataset`, or a list of items), else ``None``."""
    if isinstance(dataset, CheckedCacheDataset):
        items = dataset.loaded_items
    else:
        items = getattr(dataset, "data", None)
        transform = getattr(dataset, "transform", None)
        if transform is not None and len(getattr(transform, "transforms", [transform])) > 0:
            return None  # items are transformed when read (MONAI wraps "no transform" in an empty Compose)
    if not isinstance(items, list) or not items:
        return None
    if not all(isinstance(i, dict) and isinstance(i.get("image"), torch.Tensor)
               and isinstance(i.get("label"), torch.Tensor) for i in items):
        return None
    shapes = {(tuple(i["image"].shape), tuple(i["label"].shape)) for i in items}
    return items if len(shapes) == 1 else None  # native sizes that differ cannot be stacked


def dataset_bytes(items: list) -> int:
    """Bytes the items' tensors take."""
    return sum(item_bytes(i) for i in items)


def device_budget(device: torch.device) -> int:
    """Bytes of a CUDA device's free memory a site may fill with data (``$MEDFLARE_DEVICE_DATA_FRACTION`` of the
    free memory, default a quarter); 0 for other devices."""
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * float(os.environ.get(DEVICE_BUDGET_ENV, DEFAULT_DEVICE_FRACTION)))


def place_on_device(dataset: Optional[Dataset], device: torch.device, budget: Optional[int] = None) -> Any:
    """``dataset`` stacked on ``device`` (a :class:`TensorDictDataset`) if it is in memory and fits ``budget``
    bytes (default :func:`device_budget`: nothing on a CPU), else ``dataset`` unchanged."""
    if dataset is None:
        return None
    items = _in_memory_items(dataset)
    if items is None:
        return dataset
    budget = device_budget(device) if budget is None else budget
    if dataset_bytes(items) > budget:
        return dataset
    images = torch.stack([torch.as_tensor(i["image"]).as_subclass(torch.Tensor) for i in items]).to(device)
    labels = torch.stack([torch.as_tensor(i["label"]).as_subclass(torch.Tensor) for i in items]).to(device)
    return TensorDictDataset(images, labels)


def loader_options(dataset: Dataset, device: torch.device) -> Dict[str, Any]:
    """DataLoader options for batches bound for ``device``: pinned host memory for host data going to a GPU."""
    on_host = not isinstance(dataset, TensorDictDataset) or dataset.images.device.type == "cpu"
    return {"pin_memory": device.type == "cuda" and on_host}
