"""Brain-tissue segmentation on real anatomy: the ``"anatomy"`` variant of the built-in benchmark.

The anatomy is the ICBM 2009a nonlinear symmetric MNI152 template at 1 mm (grey- and white-matter probability maps
and the skull-stripped T1 template, shipped inside the ``nilearn`` wheel, so nothing is downloaded). Every case is
its own subject-like copy of it:

1. a random 3D similarity-plus-shear transform (rotation, scale, translation; in 2D also the axial slice position
   and a small tilt of the slice plane) and a smooth random elastic displacement field are drawn;
2. the tissue maps (CSF = brain minus GM minus WM, GM, WM, plus a skull and a scalp shell around the brain) are
   resampled through them, after an area pre-filter to the output spacing (partial volume);
3. the label is the most probable tissue: 0 background (air, scalp and skull), 1 CSF, 2 grey matter, 3 white matter;
4. the image is rendered with the tissue intensities of the site's modality, a per-case contrast jitter, a smooth
   texture, an MR bias field and noise.

=========  ====================================  ==============================================
modality   brain tissue ordering                 other
=========  ====================================  ==============================================
``t1``     WM > GM > CSF                         bright scalp fat, dark skull, MR bias field
``t2``     CSF > GM > WM                         bright CSF, MR bias field
``flair``  GM > WM > CSF                         fluid-suppressed (dark) CSF, MR bias field
``pd``     GM > CSF > WM                         low contrast, MR bias field
``ct``     GM > WM > CSF                         brain window: small tissue differences, bright bone, more noise
=========  ====================================  ==============================================

Every case draws its own transform and slice position from a stream seeded by (benchmark seed, site, split), so no
slice or deformation is shared between sites or splits.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F

ANATOMY_LABEL_NAMES: Dict[str, str] = {"0": "background", "1": "csf", "2": "gm", "3": "wm"}

TEMPLATE_FILES = {name: f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz" for name in ("t1", "gm", "wm")}
FIELD_OF_VIEW_MM = 184.0  # edge of the square (cube) the output images cover: the whole brain with a margin
# tissue channels in the order of the rendering tables: background (air), scalp, skull, csf, gm, wm
TISSUES = ("air", "scalp", "skull", "csf", "gm", "wm")


@dataclass(frozen=True)
class AnatomyStyle:
    """How one modality renders the tissue maps.

    Args:
        intensity: mean intensity of each tissue of :data:`TISSUES` (air, scalp, skull, CSF, GM, WM).
        jitter: half-width of the uniform per-case jitter added to each tissue's intensity.
        bias: coefficient range of the multiplicative MR bias field (``(0, 0)``: none).
        noise: standard deviation of the additive noise (the magnitude is taken for MR, as Rician noise is).
        texture: amplitude of the smooth within-tissue texture.
    """

    intensity: Tuple[float, float, float, float, float, float]
    jitter: float
    bias: Tuple[float, float]
    noise: float
    texture: float
    magnitude: bool = True


ANATOMY_MODALITIES: Dict[str, AnatomyStyle] = {
    "t1": AnatomyStyle((0.0, 0.70, 0.08, 0.18, 0.50, 0.75), 0.04, (0.1, 0.25), 0.025, 0.03),
    "t2": AnatomyStyle((0.0, 0.45, 0.05, 0.95, 0.55, 0.38), 0.04, (0.1, 0.25), 0.025, 0.03),
    "flair": AnatomyStyle((0.0, 0.50, 0.05, 0.10, 0.62, 0.45), 0.04, (0.1, 0.25), 0.025, 0.03),
    "pd": AnatomyStyle((0.0, 0.60, 0.08, 0.72, 0.82, 0.62), 0.03, (0.1, 0.25), 0.025, 0.03),
    "ct": AnatomyStyle((0.0, 0.12, 1.00, 0.14, 0.36, 0.28), 0.02, (0.0, 0.0), 0.045, 0.015, magnitude=False),
}


@dataclass(frozen=True)
class CaseVariation:
    """How much cases differ from the template and from each other.

    Args:
        rotation_deg: maximum in-plane (axial) rotation.
        tilt_deg: maximum rotation about the two other axes (tilts the axial slice plane).
        scale: range of the isotropic scale (head size).
        anisotropy: maximum relative difference between the axes' scales.
        shift_mm: maximum translation in the axial plane.
        slice_range: range of the axial slice position in 2D, as fractions of the brain's height (from its bottom).
        elastic_mm: standard deviation of the elastic displacement.
        elastic_points: control points per axis of the elastic field (fewer = smoother).
    """

    rotation_deg: float = 12.0
    tilt_deg: float = 6.0
    scale: Tuple[float, float] = (0.9, 1.1)
    anisotropy: float = 0.05
    shift_mm: float = 6.0
    slice_range: Tuple[float, float] = (0.40, 0.78)
    elastic_mm: float = 3.0
    elastic_points: int = 6


VARIATION = CaseVariation()


def template_dir() -> str:
    """Folder of the MNI152 2009a files inside the installed ``nilearn`` package."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'anatomy' benchmark needs the nilearn package (pip install nilearn), whose wheel "
                           "ships the MNI152 2009a template")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data")
    missing = [f for f in TEMPLATE_FILES.values() if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise RuntimeError(f"the installed nilearn lacks the MNI152 template files {missing} in {folder}")
    return folder


@functools.lru_cache(maxsize=1)
def template_tissues() -> Tuple[np.ndarray, np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Tissue probability maps of the template, ``(6, Z, Y, X)`` float32 in :data:`TISSUES` order at 1 mm, the
    brain's voxel centre ``(x, y, z)`` and its bounding box (lowest and highest voxel ``(x, y, z)``).

    CSF is the brain (T1 template above 5% of its range) minus grey and white matter; the skull is a shell 2-6 mm
    outside the brain and the scalp one 6-10 mm outside it (cube dilations).
    """
    import nibabel as nib

    folder = template_dir()
    maps = {k: np.asarray(nib.load(os.path.join(folder, f)).dataobj, dtype=np.float32) for k, f in TEMPLATE_FILES.items()}
    brain = maps["t1"] > 0.05 * 255.0
    coords = np.argwhere(brain)
    margin = 12  # room for the scalp shell
    lo = np.maximum(coords.min(axis=0) - margin, 0)
    hi = np.minimum(coords.max(axis=0) + margin + 1, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))

    def channel_first(a: np.ndarray) -> torch.Tensor:  # (X, Y, Z) -> (Z, Y, X), the layout grid_sample reads
        return torch.as_tensor(np.ascontiguousarray(a[crop].transpose(2, 1, 0)))

    mask = channel_first(brain.astype(np.float32))
    gm, wm = channel_first(maps["gm"]) * (mask / 255.0), channel_first(maps["wm"]) * (mask / 255.0)
    scale = torch.clamp(gm + wm, min=1.0)
    gm, wm = gm / scale, wm / scale
    csf = (mask - gm - wm).clamp(0.0, 1.0)

    def dilate(r: int) -> torch.Tensor:
        return _separable(mask[None, None], 2 * r + 1, F.max_pool3d)[0, 0]

    d2, d6, d10 = dilate(2), dilate(6), dilate(10)
    skull, scalp = (d6 - d2).clamp(0, 1), (d10 - d6).clamp(0, 1)
    air = (1.0 - scalp - skull - csf - gm - wm).clamp(0.0, 1.0)
    tissue = torch.stack([air, scalp, skull, csf, gm, wm]).numpy()
    inside = coords - lo
    return tissue, (inside.min(axis=0) + inside.max(axis=0)) / 2.0, (inside.min(axis=0), inside.max(axis=0))


@functools.lru_cache(maxsize=4)
def filtered_tissues(spacing_mm: float) -> torch.Tensor:
    """The tissue maps averaged over ``spacing_mm``-wide boxes (partial volume at the output spacing), at 1 mm."""
    full = torch.as_tensor(template_tissues()[0])[None]
    k = max(1, int(round(spacing_mm)))
    if k == 1:
        return full
    return _separable(full, k, functools.partial(F.avg_pool3d, count_include_pad=False))


def _separable(volume: torch.Tensor, k: int, pool) -> torch.Tensor:
    """A ``k``-wide box pooling (max or mean) of ``(B, C, Z, Y, X)``, one axis at a time, same size as the input."""
    for axis in range(3):
        kernel, padding = [1, 1, 1], [0, 0, 0]
        kernel[axis], padding[axis] = k, k // 2
        out = pool(volume, tuple(kernel), stride=1, padding=tuple(padding))
        volume = out.narrow(2 + axis, 0, volume.shape[2 + axis])
    return volume.contiguous()


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (radians) about the x, y and z axes."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _elastic(shape: Tuple[int, ...], rs: np.random.RandomState, sigma_mm: float, points: int) -> torch.Tensor:
    """Smooth random displacement (mm) at every output point, ``(*shape, 3)``: normal control points on a coarse
    grid, interpolated (bicubic in 2D, trilinear in 3D)."""
    coarse = torch.as_tensor(rs.normal(0.0, sigma_mm, size=(1, 3, *([points] * len(shape)))), dtype=torch.float32)
    mode = "bicubic" if len(shape) == 2 else "trilinear"
    field = F.interpolate(coarse, size=shape, mode=mode, align_corners=True)[0]
    return field.permute(*range(1, len(shape) + 1), 0)


def sample_case(size: int, spatial_dims: int, rs: np.random.RandomState,
                variation: CaseVariation = VARIATION) -> torch.Tensor:
    """Tissue probabilities ``(6, *spatial)`` of one random case: the template through a random transform."""
    tissue, centre, (lo, hi) = template_tissues()
    spacing = FIELD_OF_VIEW_MM / size
    volume = filtered_tissues(spacing)
    axis = (torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0) * spacing
    if spatial_dims == 2:
        v, u = torch.meshgrid(axis, axis, indexing="ij")  # rows: anterior-posterior (flipped), columns: left-right
        local = torch.stack([u, -v, torch.zeros_like(u)], dim=-1)
        height = rs.uniform(*variation.slice_range)
        offset_z = lo[2] + height * (hi[2] - lo[2]) - centre[2]
        tilt = np.deg2rad(rs.uniform(-variation.tilt_deg, variation.tilt_deg, size=2))
    else:
        w, v, u = torch.meshgrid(axis, axis, axis, indexing="ij")
        local = torch.stack([u, -v, w], dim=-1)
        offset_z = rs.uniform(-variation.shift_mm, variation.shift_mm)
        tilt = np.deg2rad(rs.uniform(-variation.tilt_deg, variation.tilt_deg, size=2))
    angles = np.array([tilt[0], tilt[1], np.deg2rad(rs.uniform(-variation.rotation_deg, variation.rotation_deg))])
    scale = rs.uniform(*variation.scale) * (1.0 + rs.uniform(-variation.anisotropy, variation.anisotropy, size=3))
    shift = np.array([rs.uniform(-variation.shift_mm, variation.shift_mm),
                      rs.uniform(-variation.shift_mm, variation.shift_mm), offset_z])
    # output point p (mm, centred) -> template voxel: centre + shift + R diag(1/scale) (p + elastic)
    matrix = torch.as_tensor(_rotation(angles) @ np.diag(1.0 / scale), dtype=torch.float32)
    points = local + _elastic(tuple(local.shape[:-1]), rs, variation.elastic_mm, variation.elastic_points)
    voxel = points @ matrix.T + torch.as_tensor(centre + shift, dtype=torch.float32)
    dims = torch.tensor([tissue.shape[3], tissue.shape[2], tissue.shape[1]], dtype=torch.float32)  # X, Y, Z
    grid = 2.0 * voxel / (dims - 1.0) - 1.0
    grid = grid.reshape(1, 1, -1, 1, 3) if spatial_dims == 2 else grid[None]
    out = F.grid_sample(volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    out = out.reshape(tissue.shape[0], *([size] * spatial_dims))
    out[0] = out[0] + (1.0 - out.sum(dim=0)).clamp_min(0.0)  # outside the template volume: air
    return out


def tissue_label(probabilities: torch.Tensor) -> np.ndarray:
    """Label map of tissue probabilities: the most probable of background (air, scalp, skull), CSF, GM, WM."""
    merged = torch.cat([probabilities[:3].sum(dim=0, keepdim=True), probabilities[3:]], dim=0)
    return merged.argmax(dim=0).numpy().astype(np.uint8)


def _smooth_field(shape: Tuple[int, ...], rs: np.random.RandomState, points: int = 12) -> np.ndarray:
    """Smooth zero-mean unit-variance random field (texture)."""
    field = _elastic(shape, rs, 1.0, points)[..., 0].numpy()
    return (field - field.mean()) / (field.std() + 1e-8)


def render_anatomy(probabilities: torch.Tensor, modality: str, rs: np.random.RandomState) -> np.ndarray:
    """Image of one case in ``modality`` (see :data:`ANATOMY_MODALITIES`), scaled to [0, 1] (float32)."""
    from monai.transforms import RandBiasField

    style = ANATOMY_MODALITIES[modality]
    levels = np.asarray(style.intensity) + rs.uniform(-style.jitter, style.jitter, size=len(TISSUES))
    levels[0] = 0.0  # air stays black
    p = probabilities.numpy()
    image = np.tensordot(levels, p, axes=1)
    shape = image.shape
    image = image + style.texture * _smooth_field(shape, rs) * (1.0 - p[0])
    if style.bias[1] > 0:
        field = RandBiasField(degree=3, coeff_range=style.bias, prob=1.0)
        field.set_random_state(int(rs.randint(1 << 30)))
        image = np.asarray(field(image[None].astype(np.float32)))[0]
    noise = rs.normal(0.0, style.noise, size=shape)
    if style.magnitude:
        image = np.sqrt((image + noise) ** 2 + rs.normal(0.0, style.noise, size=shape) ** 2)
    else:
        image = image + noise
    lo, hi = image.min(), image.max()
    return ((image - lo) / (hi - lo + 1e-8)).astype(np.float32)


def make_anatomy_case(size: int, spatial_dims: int, modality: str,
                      rs: np.random.RandomState) -> Tuple[np.ndarray, np.ndarray]:
    """One random case: image (float32 in [0, 1]) and label (uint8), both ``(size,) * spatial_dims``."""
    probabilities = sample_case(size, spatial_dims, rs)
    label = tissue_label(probabilities)
    return render_anatomy(probabilities, modality, rs), label


def min_anatomy_size(spatial_dims: int) -> int:
    """Smallest edge that still resolves the cortex: 48 pixels in 2D (3.8 mm), 32 voxels in 3D (5.8 mm)."""
    return 48 if spatial_dims == 2 else 32


def spacing_mm(size: int) -> float:
    """Pixel (voxel) spacing of the benchmark at edge ``size``."""
    return FIELD_OF_VIEW_MM / size


__all__ = ["ANATOMY_LABEL_NAMES", "ANATOMY_MODALITIES", "AnatomyStyle", "CaseVariation", "make_anatomy_case",
           "render_anatomy", "sample_case", "spacing_mm", "template_tissues", "tissue_label", "min_anatomy_size"]
