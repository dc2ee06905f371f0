"""Tiny in-memory datasets for unit tests."""

import numpy as np
import torch
from monai.data import Dataset


def square_dataset(n: int = 16, size: int = 32, seed: int = 0) -> Dataset:
    """Noisy images with one bright 8x8 square each; label 1 on the square, 0 elsewhere."""
    rs = np.random.RandomState(seed)
    items = []
    for _ in range(n):
        lab = np.zeros((1, size, size), np.int64)
        y, x = rs.randint(4, size - 12, 2)
        lab[0, y:y + 8, x:x + 8] = 1
        img = lab.astype(np.float32) + 0.1 * rs.normal(size=lab.shape).astype(np.float32)
        items.append({"image": torch.as_tensor(img), "label": torch.as_tensor(lab)})
    return Dataset(items)
