"""Deterministic synthetic multi-site classification benchmark with an image-quality shift.

Four classes by fine lesion morphology on a blobby background: 0 no lesion, 1 solid disc, 2 ring, 3 cluster of four
dots. Each site images the same kind of content at its own *quality*:

==============  ==========================================================================
quality         degradation (then per-image z-score)
==============  ==========================================================================
``hq``          clean (sensor noise sigma 0.02)
``blur``        Gaussian blur sigma 1.5
``noisy``       additive noise sigma 0.15
``lowres``      4x down-sampling (area) and bilinear up-sampling
``gauss1..5``   FFL4MIA's Gaussian corruption of the [0, 1] image: ``clip(x + N(0, c))``,
                ``c = (.08, .12, .18, .26, .38)[s - 1]``
==============  ==========================================================================

Blur and low resolution destroy the ring/disc/cluster detail, so degraded sites are intrinsically harder (the
FedISM fairness setting), not only shifted.

Two settings share the generator:

- the default 4-site benchmark: ``qualities = ("hq", "blur", "noisy", "lowres")``, uniform labels per site;
- the paper-like setting (:func:`paper_setting`): N clients (default 20), the last k corrupted with ``gauss<s>``,
  labels split by Dirichlet(alpha) *within* the clean and the corrupted group (as FFL4MIA's partition).

Besides each site's training and held-out validation split, the benchmark has a global test set rendered twice from
the same images: *clean* (``hq``) and *corrupted* (the corruptions of the corrupted sites, in turn).

Seeds: site k (1-based) draws training data from ``seed*100+k``, validation from ``seed*100+50+k``; the label
partition uses ``seed*100+99`` and the global test set ``seed*100+98``. Generated arrays are cached as ``.npz`` under
``$MEDFLARE_CACHE_DIR/synthetic_cls/<fingerprint>/`` (written atomically).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.data.synthetic import create_test_image_2d
from monai.transforms import GaussianSmooth, Resize

from ..common.atomic import atomic_write
from ..segmentation.synthetic import default_cache_dir

NUM_CLASSES = 4
CLASS_NAMES = ("none", "disc", "ring", "cluster")
GAUSS_SIGMA = (0.08, 0.12, 0.18, 0.26, 0.38)
QUALITY = {
    "hq": dict(blur=0.0, noise=0.02, down=1),
    "blur": dict(blur=1.5, noise=0.02, down=1),
    "noisy": dict(blur=0.0, noise=0.15, down=1),
    "lowres": dict(blur=0.0, noise=0.02, down=4),
}
DEFAULT_QUALITIES: Tuple[str, ...] = ("hq", "blur", "noisy", "lowres")


def is_known_quality(quality: str) -> bool:
    if quality in QUALITY:
        return True
    return quality.startswith("gauss") and quality[5:].isdigit() and 1 <= int(quality[5:]) <= len(GAUSS_SIGMA)


@dataclass(frozen=True)
class SyntheticClsConfig:
    """Settings of the synthetic classification benchmark (job-wide, identical at every site).

    Args:
        qualities: quality of site-1, site-2, ... (see the module table).
        n_train: training images per site (with a Dirichlet split: the mean per site).
        n_val: held-out validation images per site (model selection).
        n_site_test: held-out test images per site (reporting only), drawn like the validation split.
        n_test: images of the global clean (and corrupted) test set; 0 disables it.
        size: image edge in pixels (>= 32).
        dirichlet_alpha: ``None``: each site draws uniform labels; a number: Dirichlet label split within the clean
            and the corrupted group of sites.
        min_train: smallest training set a Dirichlet split may give a site.
        seed: benchmark seed.
    """

    qualities: Tuple[str, ...] = DEFAULT_QUALITIES
    n_train: int = 128
    n_val: int = 64
    n_site_test: int = 128
    n_test: int = 200
    size: int = 64
    dirichlet_alpha: Optional[float] = None
    min_train: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "qualities", tuple(self.qualities))
        unknown = [q for q in self.qualities if not is_known_quality(q)]
        if unknown:
            raise ValueError(f"unknown quality {unknown}; known: {sorted(QUALITY)} and gauss1..gauss5")
        if not self.qualities:
            raise ValueError("the benchmark needs at least one site")
        if self.size < 32:
            raise ValueError(f"size must be >= 32, got {self.size}")
        if self.n_train < 1 or self.n_val < 1 or self.n_site_test < 1 or self.n_test < 0:
            raise ValueError("n_train, n_val and n_site_test must be >= 1 and n_test >= 0")
        if self.dirichlet_alpha is not None and self.dirichlet_alpha <= 0:
            raise ValueError("dirichlet_alpha must be positive")

    @property
    def n_sites(self) -> int:
        return len(self.qualities)

    @property
    def corrupted_qualities(self) -> Tuple[str, ...]:
        """Qualities of the non-clean sites, in site order without repeats (the corrupted test set's mix)."""
        seen: List[str] = []
        for q in self.qualities:
            if q != "hq" and q not in seen:
                seen.append(q)
        return tuple(seen)

    def fingerprint(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(payload).hexdigest()[:12]


def paper_setting(n_clients: int = 20, n_corrupted: int = 4, severity: int = 3, alpha: float = 1.0,
                  **kwargs) -> SyntheticClsConfig:
    """FFL4MIA-like setting: ``n_clients`` sites, the last ``n_corrupted`` with Gaussian noise of ``severity``
    (1..5), Dirichlet(``alpha``) label split within each group. ``kwargs`` go to :class:`SyntheticClsConfig`."""
    if not 0 <= n_corrupted <= n_clients:
        raise ValueError("need 0 <= n_corrupted <= n_clients")
    qualities = ("hq",) * (n_clients - n_corrupted) + (f"gauss{severity}",) * n_corrupted
    return SyntheticClsConfig(qualities=qualities, dirichlet_alpha=alpha, **kwargs)


# ------------------------------------------------------------------------------------------------ rendering
def _smooth_noise(size: int, rs: np.random.RandomState, sigma: float = 3.0) -> np.ndarray:
    noise = torch.as_tensor(rs.normal(size=(1, size, size)), dtype=torch.float32)
    smooth = GaussianSmooth(sigma)(noise)[0].numpy()
    return smooth / (smooth.std() + 1e-8)


def render_clean(label: int, rs: np.random.RandomState, size: int = 64) -> np.ndarray:
    """A clean image of class ``label``: blobby background plus the class's lesion at a random place."""
    scale = size / 64.0
    background, _ = create_test_image_2d(size, size, num_objs=int(rs.randint(3, 8)), rad_max=max(4, int(18 * scale)),
                                         rad_min=max(2, int(8 * scale)), num_seg_classes=1, random_state=rs)
    image = 0.2 + 0.2 * background + 0.05 * _smooth_noise(size, rs)
    yy, xx = np.mgrid[:size, :size]
    margin = int(12 * scale)
    cy, cx = rs.randint(margin, size - margin, size=2)
    amplitude = rs.uniform(0.3, 0.5)
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    if label == 1:
        mask = r2 <= rs.uniform(3.5, 5.0) ** 2
    elif label == 2:
        outer = rs.uniform(5.0, 7.0)
        mask = (r2 <= outer ** 2) & (r2 >= (outer - 1.6) ** 2)
    elif label == 3:
        mask = np.zeros((size, size), bool)
        for _ in range(4):
            dy, dx = rs.uniform(-4, 4, size=2)
            mask |= ((yy - cy - dy) ** 2 + (xx - cx - dx) ** 2) <= 1.5 ** 2
    elif label == 0:
        mask = np.zeros((size, size), bool)
    else:
        raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    return (image + amplitude * mask).astype(np.float32)


def degrade(image: np.ndarray, quality: str, rs: np.random.RandomState) -> np.ndarray:
    """Apply a site quality to a clean image and z-score it (see the module table)."""
    if quality.startswith("gauss"):
        sigma = GAUSS_SIGMA[int(quality[5:]) - 1]
        lo, hi = float(image.min()), float(image.max())
        unit = (image - lo) / (hi - lo + 1e-8)
        out = np.clip(unit + rs.normal(0.0, sigma, size=image.shape), 0.0, 1.0)
    else:
        p = QUALITY[quality]
        t = torch.as_tensor(image)[None]
        if p["blur"] > 0:
            t = GaussianSmooth(p["blur"])(t)
        if p["down"] > 1:
            size = image.shape[-1]
            t = Resize((size // p["down"],) * 2, mode="area")(t)
            t = Resize((size, size), mode="bilinear")(t)
        out = np.asarray(t)[0] + rs.normal(0.0, p["noise"], size=image.shape)
    return ((out - out.mean()) / (out.std() + 1e-8)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ partition
def partition_counts(config: SyntheticClsConfig) -> np.ndarray:
    """Per-site class counts ``(n_sites, NUM_CLASSES)`` of the Dirichlet split (FFL4MIA-style).

    A balanced pool of ``n_train * n_sites`` labels is split per class between the clean and the corrupted group in
    proportion to their sizes; within a group each class is spread over the group's sites by Dirichlet(alpha).
    Draws are repeated (deterministically) until every site has at least ``min_train`` images.
    """
    n = config.n_sites
    if config.dirichlet_alpha is None:
        raise ValueError("partition_counts needs dirichlet_alpha")
    rs = np.random.RandomState(config.seed * 100 + 99)
    total = config.n_train * n
    per_class = np.full(NUM_CLASSES, total // NUM_CLASSES)
    per_class[: total % NUM_CLASSES] += 1
    clean = [i for i, q in enumerate(config.qualities) if q == "hq"]
    corrupted = [i for i, q in enumerate(config.qualities) if q != "hq"]
    groups = [g for g in (clean, corrupted) if g]
    for _ in range(1000):
        counts = np.zeros((n, NUM_CLASSES), dtype=np.int64)
        for c in range(NUM_CLASSES):
            remaining = int(per_class[c])
            for gi, group in enumerate(groups):
                share = remaining if gi == len(groups) - 1 else int(round(per_class[c] * len(group) / n))
                share = min(share, remaining)
                remaining -= share
                props = rs.dirichlet(np.full(len(group), config.dirichlet_alpha))
                split = np.floor(props * share).astype(np.int64)
                split[np.argmax(props)] += share - split.sum()
                counts[group, c] = split
        if counts.sum(axis=1).min() >= config.min_train:
            return counts
    raise ValueError(f"could not give every site >= {config.min_train} images; lower min_train or raise n_train")


SPLIT_OFFSETS = {"train": 0, "test": 25, "val": 50}


def site_labels(config: SyntheticClsConfig, site_index: int, split: str) -> np.ndarray:
    """Labels of one site's ``train``, ``val`` or ``test`` split (test is drawn like validation)."""
    if split == "train":
        rs = np.random.RandomState(config.seed * 100 + site_index + 1)
        if config.dirichlet_alpha is None:
            return rs.randint(0, NUM_CLASSES, config.n_train)
        counts = partition_counts(config)[site_index]
        return rs.permutation(np.repeat(np.arange(NUM_CLASSES), counts))
    rs = np.random.RandomState(config.seed * 100 + SPLIT_OFFSETS[split] + site_index + 1)
    n = config.n_val if split == "val" else config.n_site_test
    if config.dirichlet_alpha is None:
        return rs.randint(0, NUM_CLASSES, n)
    counts = partition_counts(config)[site_index].astype(np.float64)
    return rs.choice(NUM_CLASSES, size=n, p=counts / counts.sum())


def make_site_arrays(config: SyntheticClsConfig, site_index: int, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, size, size)`` float32 and labels ``(N,)`` int64 of a site's split."""
    if not 0 <= site_index < config.n_sites:
        raise ValueError(f"site index {site_index} out of range for {config.n_sites} synthetic sites")
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"split must be one of {sorted(SPLIT_OFFSETS)}, got {split!r}")
    labels = site_labels(config, site_index, split)
    rs = np.random.RandomState(config.seed * 100 + SPLIT_OFFSETS[split] + site_index + 1 + 10_000)
    quality = config.qualities[site_index]
    images = [degrade(render_clean(int(c), rs, config.size), quality, rs) for c in labels]
    return np.stack(images)[:, None], labels.astype(np.int64)


def make_global_test(config: SyntheticClsConfig) -> Dict[str, np.ndarray]:
    """The global test set: ``clean`` (hq) and ``corrupted`` renderings of the same images, and ``labels``."""
    rs = np.random.RandomState(config.seed * 100 + 98)
    labels = rs.randint(0, NUM_CLASSES, config.n_test).astype(np.int64)
    corrupted_q = config.corrupted_qualities or ("gauss3",)
    clean, corrupted = [], []
    for i, c in enumerate(labels):
        base = render_clean(int(c), rs, config.size)
        clean.append(degrade(base, "hq", rs))
        corrupted.append(degrade(base, corrupted_q[i % len(corrupted_q)], rs))
    return {"clean": np.stack(clean)[:, None], "corrupted": np.stack(corrupted)[:, None], "labels": labels}


# ------------------------------------------------------------------------------------------------ cache
def _atomic_savez(path: str, **arrays: np.ndarray) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _cache_root(config: SyntheticClsConfig, cache_dir: Optional[str]) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "synthetic_cls", config.fingerprint())


def load_site_arrays(config: SyntheticClsConfig, site_index: int, cache_dir: Optional[str] = None
                     ) -> Dict[str, np.ndarray]:
    """A site's ``train_x, train_y, val_x, val_y, test_x, test_y`` (generated once, then read from the cache)."""
    path = os.path.join(_cache_root(config, cache_dir), f"site-{site_index + 1}.npz")
    if not os.path.isfile(path):
        arrays = {}
        for split in ("train", "val", "test"):
            arrays[f"{split}_x"], arrays[f"{split}_y"] = make_site_arrays(config, site_index, split)
        _atomic_savez(path, **arrays)
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def load_global_test(config: SyntheticClsConfig, cache_dir: Optional[str] = None) -> Dict[str, np.ndarray]:
    """The global clean/corrupted test arrays (generated once, then cached)."""
    path = os.path.join(_cache_root(config, cache_dir), "global-test.npz")
    if not os.path.isfile(path):
        _atomic_savez(path, **make_global_test(config))
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def class_counts(labels: Sequence[int], num_classes: int = NUM_CLASSES) -> List[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
