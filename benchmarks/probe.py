"""How well sites can be told apart from a model's encoder features: a linear probe (offline analysis only).

Used by the benchmark runners, where every site's held-out images are at hand; nothing here runs in a federation.
Chance level is ``1 / n_sites``; a probe near chance means the encoder's features no longer reveal the site
(the modalities are aligned), a probe near 1 means they do.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


@torch.no_grad()
def pooled_features(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                    batch_size: int = 32) -> np.ndarray:
    """Globally average-pooled bottleneck features ``(N, C)`` of every image of ``dataset``.

    ``model`` must provide ``encode(images)`` (e.g. :class:`medflare.segmentation.networks.FeatureUNet`).
    """
    was_training = model.training
    model.eval()
    out = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        features = model.encode(batch["image"].to(device))
        out.append(features.flatten(2).mean(dim=2).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out)


def site_feature_set(model: torch.nn.Module, datasets: Mapping[str, Dataset],
                     device: torch.device) -> Tuple[np.ndarray, np.ndarray]:
    """Features of every site's images and the site index of each row (sites in sorted name order)."""
    xs, ys = [], []
    for index, site in enumerate(sorted(datasets)):
        x = pooled_features(model, datasets[site], device)
        xs.append(x)
        ys.append(np.full(len(x), index))
    return np.concatenate(xs), np.concatenate(ys)


def intensity_histograms(dataset: Dataset, bins: int = 32) -> np.ndarray:
    """Normalised intensity histograms ``(N, bins)`` of every image of ``dataset`` over [0, 1] (the loader's
    scale): the probe's reference on raw images, which tells how visible the site is before any network."""
    out = []
    for item in dataset:
        values = torch.as_tensor(item["image"]).flatten().float().clamp(0.0, 1.0)
        hist = torch.histc(values, bins=bins, min=0.0, max=1.0)
        out.append((hist / hist.sum().clamp_min(1.0)).numpy())
    return np.stack(out)


def site_histogram_set(datasets: Mapping[str, Dataset], bins: int = 32) -> Tuple[np.ndarray, np.ndarray]:
    """Intensity histograms of every site's images and the site index of each row (sites in sorted name order)."""
    xs, ys = [], []
    for index, site in enumerate(sorted(datasets)):
        x = intensity_histograms(datasets[site], bins)
        xs.append(x)
        ys.append(np.full(len(x), index))
    return np.concatenate(xs), np.concatenate(ys)


def linear_probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0, train_fraction: float = 0.5,
                          epochs: int = 300, lr: float = 0.1, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression predicting ``labels`` from ``features``.

    Each class is split ``train_fraction`` / rest at random (``seed``); features are standardised with the
    training part's statistics; full-batch Adam for ``epochs`` steps.
    """
    features = np.asarray(features, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be (N, C) with one label per row, got {features.shape} and {labels.shape}")
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError("a probe needs at least two classes")
    rs = np.random.RandomState(seed)
    train_idx, test_idx = [], []
    for c in classes:
        idx = rs.permutation(np.flatnonzero(labels == c))
        cut = max(1, min(len(idx) - 1, int(round(train_fraction * len(idx)))))
        train_idx.append(idx[:cut])
        test_idx.append(idx[cut:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    mean = features[train_idx].mean(axis=0)
    std = features[train_idx].std(axis=0) + 1e-6
    x = torch.as_tensor((features - mean) / std)
    y = torch.as_tensor(np.searchsorted(classes, labels))
    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(x.shape[1], len(classes))
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=generator) * 0.01)
        probe.bias.zero_()
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    xtr, ytr = x[train_idx], y[train_idx]
    for _ in range(epochs):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(xtr), ytr).backward()
        optimizer.step()
    with torch.no_grad():
        return float((probe(x[test_idx]).argmax(dim=1) == y[test_idx]).float().mean())
