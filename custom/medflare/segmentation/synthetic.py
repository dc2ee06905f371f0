"""Deterministic synthetic multi-site segmentation benchmark with a modality shift.

Every site images the same kind of anatomy (label 1 "organ": a few large blobs; label 2 "lesion": small blobs
inside the organ), but renders it with the tissue-intensity ordering of its own modality:

=========  =====================  =========================================
modality   intensity ordering     notes
=========  =====================  =========================================
``t1``     organ > lesion > bg    hypo-intense lesion, MR bias field
``t2``     lesion > organ > bg    hyper-intense lesion, MR bias field
``ct``     lesion > bg > organ    bright soft-tissue background, no bias
``flair``  organ > bg > lesion    dark (fluid-suppressed) lesion, bias field
=========  =====================  =========================================

Because the *ordering* of intensities differs, per-image normalisation cannot undo the shift: a model trained on
one modality segments another poorly, while shapes stay modality-invariant so a single model can learn all of them.

The ``"anatomy"`` variant images real brain anatomy instead (the MNI152 template, four labels: background, CSF,
grey and white matter) in T1-, T2-, FLAIR-, PD- and CT-like contrasts; see :mod:`medflare.segmentation.anatomy`.

Images are written as NIfTI files with a MONAI Decathlon-style datalist per site, so synthetic and real data go
through the same loader (:mod:`medflare.data.datalist`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.data.synthetic import create_test_image_2d, create_test_image_3d
from monai.transforms import GaussianSmooth, RandBiasField

from .anatomy import ANATOMY_LABEL_NAMES, ANATOMY_MODALITIES, make_anatomy_case, min_anatomy_size

LABEL_NAMES: Dict[str, str] = {"0": "background", "1": "organ", "2": "lesion"}


@dataclass(frozen=True)
class ModalityStyle:
    """How one modality renders the label map.

    Args:
        lut: mean intensity of (background, organ, lesion).
        bias: coefficient range of the multiplicative bias field (``(0, 0)`` disables it).
        noise: standard deviation of additive Gaussian noise.
        texture: amplitude of low-frequency tissue texture.
    """

    lut: Tuple[float, float, float]
    bias: Tuple[float, float]
    noise: float
    texture: float


MODALITIES: Dict[str, ModalityStyle] = {
    "t1": ModalityStyle(lut=(0.05, 0.60, 0.30), bias=(0.1, 0.25), noise=0.03, texture=0.04),
    "t2": ModalityStyle(lut=(0.05, 0.35, 0.90), bias=(0.1, 0.25), noise=0.03, texture=0.04),
    "ct": ModalityStyle(lut=(0.45, 0.25, 0.75), bias=(0.0, 0.0), noise=0.05, texture=0.02),
    "flair": ModalityStyle(lut=(0.40, 0.70, 0.10), bias=(0.1, 0.25), noise=0.03, texture=0.04),
}

# the "ellipses" variant: other anatomy (elongated, rotated organs; lesions of varied shape) and other contrasts
# (each modality's tissue ordering kept, levels, noise and a per-image gamma changed), for checking that training
# defaults chosen on the default variant carry over to data they were not tuned on
ELLIPSE_MODALITIES: Dict[str, ModalityStyle] = {
    "t1": ModalityStyle(lut=(0.10, 0.50, 0.25), bias=(0.05, 0.2), noise=0.06, texture=0.06),
    "t2": ModalityStyle(lut=(0.10, 0.30, 0.80), bias=(0.05, 0.2), noise=0.06, texture=0.06),
    "ct": ModalityStyle(lut=(0.55, 0.30, 0.85), bias=(0.0, 0.0), noise=0.08, texture=0.03),
    "flair": ModalityStyle(lut=(0.30, 0.65, 0.05), bias=(0.05, 0.2), noise=0.06, texture=0.06),
}
VARIANTS: Tuple[str, ...] = ("blobs", "ellipses", "anatomy")


def variant_modalities(variant: str) -> Tuple[str, ...]:
    """The modalities a benchmark variant can render."""
    return tuple(ANATOMY_MODALITIES) if variant == "anatomy" else tuple(MODALITIES)


def variant_label_names(variant: str) -> Dict[str, str]:
    """``{"0": "background", ...}``: the classes of a benchmark variant's label maps."""
    return dict(ANATOMY_LABEL_NAMES if variant == "anatomy" else LABEL_NAMES)

DEFAULT_MODALITIES: Tuple[str, ...] = ("t1", "t2", "ct", "flair")


@dataclass(frozen=True)
class SyntheticSegConfig:
    """Settings of the synthetic segmentation benchmark (job-wide, identical at every site).

    Args:
        modalities: modality of site-1, site-2, ...; see :data:`MODALITIES`.
        n_train: training images per site.
        site_n_train: training images of site-1, site-2, ... (one per modality) when the sites differ in size,
            e.g. ``(200, 200, 20)`` for a small third site; ``None`` (default): ``n_train`` at every site.
        n_val: validation images per site (model selection).
        n_test: test images per site (reporting only; never used to choose anything).
        size: edge length in pixels (voxels in 3D); must be at least 48 in 2D and 32 in 3D.
        spatial_dims: 2 or 3.
        variant: ``"blobs"`` (default: round organs and lesions), ``"ellipses"`` (elongated rotated organs,
            lesions of varied shape, other contrast levels and noise, a random gamma per image) or ``"anatomy"``
            (brain tissue on the MNI152 template: 4 classes, modalities ``t1``, ``t2``, ``flair``, ``pd``, ``ct``;
            see :mod:`medflare.segmentation.anatomy`).
        seed: benchmark seed; site ``k`` draws training data from ``seed*100+k``, validation from ``seed*100+50+k``
            and test data from ``seed*100+25+k`` (so adding the test split left the other two unchanged).
    """

    modalities: Tuple[str, ...] = DEFAULT_MODALITIES
    n_train: int = 160
    n_val: int = 40
    n_test: int = 100
    size: int = 64
    spatial_dims: int = 2
    variant: str = "blobs"
    seed: int = 0
    site_n_train: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown synthetic variant {self.variant!r}; known: {list(VARIANTS)}")
        known = variant_modalities(self.variant)
        unknown = [m for m in self.modalities if m not in known]
        if unknown:
            raise ValueError(f"unknown synthetic modality {unknown} for the {self.variant!r} benchmark; known: "
                             f"{sorted(known)}")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        min_size = min_anatomy_size(self.spatial_dims) if self.variant == "anatomy" else \
            (48 if self.spatial_dims == 2 else 32)
        if self.size < min_size:
            raise ValueError(f"synthetic size must be >= {min_size} for {self.spatial_dims}D, got {self.size}")
        if self.n_train < 1 or self.n_val < 1 or self.n_test < 1:
            raise ValueError("n_train, n_val and n_test must be >= 1")
        if self.site_n_train is not None:
            object.__setattr__(self, "site_n_train", tuple(int(n) for n in self.site_n_train))
            if len(self.site_n_train) != len(self.modalities) or min(self.site_n_train) < 1:
                raise ValueError(f"site_n_train needs one count >= 1 per site ({len(self.modalities)}), got "
                                 f"{list(self.site_n_train)}")

    @property
    def label_names(self) -> Dict[str, str]:
        """The classes of this benchmark's label maps (``{"0": "background", ...}``)."""
        return variant_label_names(self.variant)

    @property
    def num_classes(self) -> int:
        """Classes of the label maps, background included."""
        return len(self.label_names)

    def n_images(self, site_index: int, split: str) -> int:
        """Images of one site's ``"train"``, ``"val"`` or ``"test"`` split."""
        if split == "train" and self.site_n_train is not None:
            return self.site_n_train[site_index]
        return {"train": self.n_train, "val": self.n_val, "test": self.n_test}[split]

    def fingerprint(self) -> str:
        """Short hash of the settings, used to name the on-disk cache (the default variant hashes as before)."""
        settings = asdict(self)
        if settings["site_n_train"] is None:
            settings.pop("site_n_train")
        if settings["variant"] == "blobs":
            settings.pop("variant")
        payload = json.dumps(settings, sort_keys=True).encode()
        return hashlib.sha1(payload).hexdigest()[:12]


def _blobs(shape: Tuple[int, ...], rs: np.random.RandomState, n_objs: int, rad_min: int, rad_max: int) -> np.ndarray:
    """Binary mask of ``n_objs`` random discs (2D) or spheres (3D)."""
    if len(shape) == 2:
        _, mask = create_test_image_2d(*shape, num_objs=n_objs, rad_max=rad_max, rad_min=rad_min,
                                       num_seg_classes=1, random_state=rs)
    else:
        _, mask = create_test_image_3d(*shape, num_objs=n_objs, rad_max=rad_max, rad_min=rad_min,
                                       num_seg_classes=1, random_state=rs)
    return mask > 0


def make_label_map(shape: Tuple[int, ...], rs: np.random.RandomState) -> np.ndarray:
    """Label map with 0 background, 1 organ (large blobs) and 2 lesion (small blobs inside the organ)."""
    edge = min(shape)
    organ = _blobs(shape, rs, rs.randint(1, 4), rad_min=max(4, edge // 6), rad_max=max(6, edge * 5 // 16))
    lesion = _blobs(shape, rs, rs.randint(3, 8), rad_min=2, rad_max=max(3, edge // 10))
    label = organ.astype(np.uint8)
    label[organ & lesion] = 2
    return label


def _ellipsoids(shape: Tuple[int, ...], rs: np.random.RandomState, n_objs: int, rad_min: float,
                rad_max: float, elongation: Tuple[float, float]) -> np.ndarray:
    """Binary mask of ``n_objs`` randomly rotated ellipses (2D) or ellipsoids (3D)."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), axis=-1)
    mask = np.zeros(shape, dtype=bool)
    dims = len(shape)
    for _ in range(n_objs):
        radii = np.full(dims, rs.uniform(rad_min, rad_max))
        radii[0] *= rs.uniform(*elongation)
        rotation, _ = np.linalg.qr(rs.normal(size=(dims, dims)))
        margin = min(radii.max(), min(shape) / 2 - 1)
        centre = np.array([rs.uniform(margin, n - margin) for n in shape])
        local = (grid - centre) @ rotation
        mask |= np.sum((local / radii) ** 2, axis=-1) <= 1.0
    return mask


def make_ellipse_label_map(shape: Tuple[int, ...], rs: np.random.RandomState) -> np.ndarray:
    """Label map of the ``"ellipses"`` variant: 1-2 elongated organs, 2-6 lesions of varied shape inside them."""
    edge = min(shape)
    organ = _ellipsoids(shape, rs, rs.randint(1, 3), edge / 8, edge / 5, (1.5, 2.5))
    lesion = _ellipsoids(shape, rs, rs.randint(2, 7), 1.5, max(2.5, edge / 14), (1.0, 2.0))
    label = organ.astype(np.uint8)
    label[organ & lesion] = 2
    return label


def _smooth_noise(shape: Tuple[int, ...], rs: np.random.RandomState, sigma: float = 3.0) -> np.ndarray:
    noise = torch.as_tensor(rs.normal(size=(1, *shape)), dtype=torch.float32)
    smooth = GaussianSmooth(sigma)(noise)[0].numpy()
    return smooth / (smooth.std() + 1e-8)


def render(label: np.ndarray, modality: str, rs: np.random.RandomState, variant: str = "blobs") -> np.ndarray:
    """Render a label map as an image of ``modality`` (in the benchmark ``variant``), scaled to [0, 1] (float32)."""
    style = (ELLIPSE_MODALITIES if variant == "ellipses" else MODALITIES)[modality]
    lut = np.asarray(style.lut) + rs.uniform(-0.04, 0.04, size=3)  # per-subject contrast jitter
    image = lut[label] + style.texture * _smooth_noise(label.shape, rs)
    if style.bias[1] > 0:
        field = RandBiasField(degree=3, coeff_range=style.bias, prob=1.0)
        field.set_random_state(int(rs.randint(1 << 30)))
        image = np.asarray(field(image[None].astype(np.float32)))[0]
    image = image + rs.normal(0.0, style.noise, size=image.shape)
    lo, hi = image.min(), image.max()
    image = (image - lo) / (hi - lo + 1e-8)
    if variant == "ellipses":
        image = image ** rs.uniform(0.7, 1.4)
    return image.astype(np.float32)


def make_site_arrays(config: SyntheticSegConfig, site_index: int, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images and labels of one site's split as arrays ``(N, *spatial)``.

    Args:
        config: benchmark settings.
        site_index: 0-based index into ``config.modalities``.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """
    if not 0 <= site_index < len(config.modalities):
        raise ValueError(f"site index {site_index} out of range for {len(config.modalities)} synthetic sites")
    offsets = {"train": 0, "test": 25, "val": 50}
    if split not in offsets:
        raise ValueError(f"split must be one of {sorted(offsets)}, got {split!r}")
    rs = np.random.RandomState(config.seed * 100 + offsets[split] + site_index + 1)
    n = config.n_images(site_index, split)
    shape = (config.size,) * config.spatial_dims
    modality = config.modalities[site_index]
    if config.variant == "anatomy":
        cases = [make_anatomy_case(config.size, config.spatial_dims, modality, rs) for _ in range(n)]
        return np.stack([c[0] for c in cases]), np.stack([c[1] for c in cases])
    make_labels = make_ellipse_label_map if config.variant == "ellipses" else make_label_map
    labels = [make_labels(shape, rs) for _ in range(n)]
    images = [render(lab, modality, rs, config.variant) for lab in labels]
    return np.stack(images), np.stack(labels)


@dataclass
class SiteDataset:
    """Where one site's benchmark data was written."""

    site_index: int
    modality: str
    root: str
    datalist: str
    counts: Dict[str, int] = field(default_factory=dict)


def _save_nifti(array: np.ndarray, path: str) -> None:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def write_site_dataset(config: SyntheticSegConfig, site_index: int, out_dir: str) -> SiteDataset:
    """Write one site's images/labels as NIfTI plus a Decathlon-style ``dataset.json`` into ``out_dir``."""
    modality = config.modalities[site_index]
    os.makedirs(os.path.join(out_dir, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "labelsTr"), exist_ok=True)
    entries: Dict[str, List[Dict[str, str]]] = {"training": [], "validation": [], "test": []}
    for split, key in (("train", "training"), ("val", "validation"), ("test", "test")):
        images, labels = make_site_arrays(config, site_index, split)
        if split == "train":
            write_preview(images, labels, os.path.join(out_dir, "preview.png"))
        for i, (img, lab) in enumerate(zip(images, labels)):
            name = f"{split}_{i:04d}.nii.gz"
            _save_nifti(img, os.path.join(out_dir, "imagesTr", name))
            _save_nifti(lab.astype(np.uint8), os.path.join(out_dir, "labelsTr", name))
            entries[key].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    datalist = {
        "name": f"medflare-synthetic-{modality}",
        "description": "medflare synthetic multi-modality segmentation benchmark",
        "tensorImageSize": f"{config.spatial_dims}D",
        "modality": {"0": modality.upper()},
        "labels": config.label_names,
        "numTraining": len(entries["training"]),
        "benchmark": asdict(config),
        **entries,
    }
    path = os.path.join(out_dir, "dataset.json")
    with open(path, "w") as f:
        json.dump(datalist, f, indent=1)
    return SiteDataset(site_index, modality, out_dir, path,
                       {k: len(v) for k, v in entries.items()})


def write_preview(images: np.ndarray, labels: np.ndarray, path: str, n_cases: int = 4) -> None:
    """A PNG of the first ``n_cases`` cases (2D images, or the middle axial slice of volumes): images on the top
    row, label maps (grey levels by class) below."""
    from PIL import Image

    def plane(a: np.ndarray) -> np.ndarray:
        return a if a.ndim == 2 else a[a.shape[0] // 2]

    n = min(n_cases, len(images))
    top = np.concatenate([plane(images[i]) for i in range(n)], axis=1)
    bottom = np.concatenate([plane(labels[i]) for i in range(n)], axis=1) / max(1, int(labels.max()))
    grid = np.concatenate([top, bottom], axis=0)
    Image.fromarray((np.clip(grid, 0.0, 1.0) * 255).astype(np.uint8)).save(path)


def default_cache_dir() -> str:
    """Cache root: ``$MEDFLARE_CACHE_DIR`` or ``~/.cache/medflare``."""
    return os.environ.get("MEDFLARE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "medflare")


def ensure_site_dataset(config: SyntheticSegConfig, site_index: int, cache_dir: str | None = None) -> SiteDataset:
    """Generate one site's part of the benchmark once and reuse it afterwards.

    Generation writes into a temporary folder that is renamed into place, so concurrent sites or an interrupted
    run never leave a half-written dataset behind.
    """
    cache_dir = cache_dir or default_cache_dir()
    modality = config.modalities[site_index]
    final = os.path.join(cache_dir, "synthetic_seg", config.fingerprint(), f"site-{site_index + 1}-{modality}")
    datalist = os.path.join(final, "dataset.json")
    if os.path.isfile(datalist):
        with open(datalist) as f:
            data = json.load(f)
        return SiteDataset(site_index, modality, final, datalist,
                           {k: len(data.get(k, [])) for k in ("training", "validation", "test")})
    os.makedirs(os.path.dirname(final), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(final))
    try:
        write_site_dataset(config, site_index, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; keep its copy
            if not os.path.isfile(datalist):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return ensure_site_dataset(config, site_index, cache_dir)


def write_benchmark(config: SyntheticSegConfig, out_dir: str, sites: Sequence[int] | None = None) -> List[SiteDataset]:
    """Write the whole benchmark (or the given 0-based ``sites``) under ``out_dir/site-k``; returns what was written."""
    indices = range(len(config.modalities)) if sites is None else sites
    return [write_site_dataset(config, k, os.path.join(out_dir, f"site-{k + 1}")) for k in indices]
