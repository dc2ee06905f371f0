"""Loading a site's images and labels from a MONAI Decathlon-style datalist.

A datalist is a JSON file with ``"training"`` and ``"validation"`` lists of ``{"image": path, "label": path}``
entries; relative paths resolve against ``base_dir`` (default: the datalist's folder). Images may be NIfTI
(2D or 3D), DICOM or PNG/JPEG: whatever MONAI's :class:`~monai.transforms.LoadImaged` reads.

Every item is checked when it is loaded; bad input raises :class:`DataError` naming the offending file:
a missing file, an image/label shape mismatch, a label value outside the declared classes, an empty list.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from monai.data import CacheDataset, Dataset, load_decathlon_datalist
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
)

from .checks import (DataError, check_dicom_folder, check_inside_root,  # noqa: F401 (DataError is re-exported)
                     root_cause)


@dataclass(frozen=True)
class ImageSpec:
    """What the job's model expects from every site's data (job-wide).

    Args:
        num_classes: number of label classes including background; labels must lie in ``0..num_classes-1``.
        spatial_dims: 2 or 3.
        spatial_size: size every image/label pair is resized to; ``None`` keeps the native size (then all images
            must already share one size).
        in_channels: number of image channels the model takes.
        intensity: ``"minmax"`` (scale each image to [0, 1]), ``"zscore"`` (per-image mean/std), or
            ``"window"`` (clip ``window`` = ``[low, high]`` to [0, 1], e.g. a CT window in HU).
        window: the intensity window used when ``intensity == "window"``.
    """

    num_classes: int = 3
    spatial_dims: int = 2
    spatial_size: Optional[Tuple[int, ...]] = (64, 64)
    in_channels: int = 1
    intensity: str = "minmax"
    window: Optional[Tuple[float, float]] = None

    def __post_init__(self) -> None:
        if self.spatial_size is not None:
            object.__setattr__(self, "spatial_size", tuple(int(s) for s in self.spatial_size))
            if len(self.spatial_size) != self.spatial_dims:
                raise ValueError(f"spatial_size {self.spatial_size} does not have {self.spatial_dims} dimensions")
        if self.intensity not in ("minmax", "zscore", "window"):
            raise ValueError(f"intensity must be 'minmax', 'zscore' or 'window', got {self.intensity!r}")
        if self.intensity == "window" and (self.window is None or len(self.window) != 2):
            raise ValueError("intensity='window' needs window=[low, high]")
        if self.num_classes < 2:
            raise ValueError("num_classes must be >= 2 (background plus at least one class)")


class CheckPaird(MapTransform):
    """Check an image/label pair after loading: channel count, matching shapes, label values.

    Raises :class:`DataError` naming the files.
    """

    def __init__(self, spec: ImageSpec, keys: Sequence[str] = ("image", "label")) -> None:
        super().__init__(keys)
        self.spec = spec

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        image, label = data["image"], data["label"]
        img_file, lab_file = _source(image), _source(label)
        check_image_shape(image, self.spec)
        if label.shape[0] != 1:
            raise DataError(f"{lab_file}: label must have one channel, got {label.shape[0]}")
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise DataError(f"image/label shape mismatch: {img_file} has {tuple(image.shape[1:])}, "
                            f"{lab_file} has {tuple(label.shape[1:])}")
        values = torch.unique(torch.as_tensor(label))
        bad = [v for v in values.tolist() if v != int(v) or not 0 <= v < self.spec.num_classes]
        if bad:
            bad = [int(v) if v == int(v) else v for v in bad]
            raise DataError(f"{lab_file}: label values {bad[:5]} outside the declared classes "
                            f"0..{self.spec.num_classes - 1}")
        check_image_values(image)
        return data


def check_image_shape(image: Any, spec: ImageSpec) -> None:
    """Raise :class:`DataError` naming the file when a channel-first image does not have the spatial dimensions
    and channels of ``spec``."""
    if image.ndim != spec.spatial_dims + 1:
        raise DataError(f"{_source(image)}: image has {image.ndim - 1} spatial dimensions, expected {spec.spatial_dims}")
    if image.shape[0] != spec.in_channels:
        raise DataError(f"{_source(image)}: image has {image.shape[0]} channels, the model expects {spec.in_channels}")


def check_image_values(image: Any) -> None:
    """Raise :class:`DataError` naming the file when an image holds NaN or infinite values."""
    if not torch.isfinite(torch.as_tensor(image)).all():
        raise DataError(f"{_source(image)}: image contains NaN or infinite values")


class CheckImaged(MapTransform):
    """Check an image alone after loading (inference): spatial dimensions, channels and finite values.

    Raises :class:`DataError` naming the file.
    """

    def __init__(self, spec: ImageSpec, keys: Sequence[str] = ("image",)) -> None:
        super().__init__(keys)
        self.spec = spec

    def __call__(self, data: Dict[str, Any]) -> Dict[str, Any]:
        for key in self.key_iterator(data):
            check_image_shape(data[key], self.spec)
            check_image_values(data[key])
        return data


def _source(x: Any) -> str:
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory>"))


def build_transforms(spec: ImageSpec) -> Compose:
    """Deterministic loading transforms: read, channel-first, check, normalise intensity, resize."""
    steps: List[Callable] = [
        LoadImaged(keys=("image", "label"), image_only=True),
        EnsureChannelFirstd(keys=("image", "label")),
        CheckPaird(spec),
        intensity_transform(spec),
    ]
    if spec.spatial_size is not None:
        steps.append(Resized(keys=("image", "label"), spatial_size=spec.spatial_size, mode=("area", "nearest")))
    steps.append(EnsureTyped(keys=("image", "label"), dtype=(torch.float32, torch.long), track_meta=False))
    return Compose(steps)


def intensity_transform(spec: ImageSpec, keys: Sequence[str] = ("image",)) -> MapTransform:
    """The intensity scaling of ``spec`` (``minmax``, ``zscore`` or ``window``; see :class:`ImageSpec`)."""
    if spec.intensity == "minmax":
        return ScaleIntensityd(keys=keys, channel_wise=True)
    if spec.intensity == "zscore":
        return NormalizeIntensityd(keys=keys, channel_wise=True)
    low, high = spec.window
    return ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


def image_transforms(spec: ImageSpec) -> Compose:
    """The loading transforms of :func:`build_transforms` for an image without a label (inference): read,
    channel-first, check, normalise intensity, resize (area). Metadata is kept, so that MONAI's ``Invertd`` can
    take a prediction back to the image's own grid."""
    steps: List[Callable] = [
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        CheckImaged(spec),
        intensity_transform(spec),
    ]
    if spec.spatial_size is not None:
        steps.append(Resized(keys="image", spatial_size=spec.spatial_size, mode="area"))
    steps.append(EnsureTyped(keys="image", dtype=torch.float32))
    return Compose(steps)


def read_datalist(path: str, key: str, base_dir: Optional[str] = None, data_root: Optional[str] = None,
                  allow_outside_root: bool = False) -> List[Dict[str, str]]:
    """Entries of ``key`` in a Decathlon-style datalist with absolute paths, checked to exist.

    Args:
        path: the datalist.
        key: the list to read (``"training"``, ``"validation"``, ``"test"``...).
        base_dir: folder relative entries resolve against (default: the datalist's folder).
        data_root: folder every listed file must lie in (default: ``base_dir``).
        allow_outside_root: the site's explicit permission to list files anywhere.

    Raises:
        DataError: the datalist is missing or unreadable, the key is absent or empty, an entry lacks
            ``image``/``label`` (as strings), a listed file does not exist or lies outside the data root, or a
            listed DICOM folder holds more than one series.
    """
    if not os.path.isfile(path):
        raise DataError(f"datalist not found: {path}")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise DataError(f"datalist {path}: expected a JSON object of lists")
    if key not in raw:
        raise DataError(f"datalist {path} has no '{key}' list (keys: {sorted(raw)})")
    if not raw[key]:
        raise DataError(f"datalist {path}: the '{key}' list is empty")
    if not isinstance(raw[key], list):
        raise DataError(f"datalist {path}: '{key}' must be a list of {{'image', 'label'}} entries")
    for i, entry in enumerate(raw[key]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("image", "label")):
            raise DataError(f"datalist {path}: '{key}' entry {i} needs 'image' and 'label' paths, got {entry!r}")
    base_dir = base_dir or os.path.dirname(os.path.abspath(path))
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key, base_dir=base_dir)
    for item in items:
        for k in ("image", "label"):
            check_inside_root(item[k], data_root or base_dir, f"{k} file listed in {path}", allow_outside_root)
            if not os.path.exists(item[k]):
                raise DataError(f"{k} file listed in {path} not found: {item[k]}")
            if os.path.isdir(item[k]):
                check_dicom_folder(item[k])
    return items


def _load_one(transform: Compose, item: Dict[str, str]) -> Dict[str, Any]:
    """Apply ``transform``, turning MONAI's wrapped errors back into a :class:`DataError` naming the files."""
    try:
        return transform(item)
    except DataError:
        raise
    except Exception as e:  # MONAI wraps errors raised inside transforms
        cause = root_cause(e)
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"cannot load {item.get('image')} / {item.get('label')}: {cause}") from e


def load_checked(transform: Compose, item: Dict[str, str]) -> Dict[str, Any]:
    """Apply loading transforms to one item; any error becomes a :class:`DataError` naming the files."""
    return _load_one(transform, item)


class CheckedDataset(Dataset):
    """Lazily loading dataset whose errors name the file at fault."""

    def _transform(self, index: int) -> Dict[str, Any]:
        return _load_one(self.transform, self.data[index])


class CheckedCacheDataset(CacheDataset):
    """MONAI's :class:`~monai.data.CacheDataset` over loading transforms that are all deterministic: every item is
    loaded and checked once, up front, by a pool of threads, and kept in memory; errors name the file at fault.

    Args:
        items: datalist entries with absolute paths.
        transform: the loading transforms (:func:`build_transforms`).
        first: ``items[0]`` already loaded (the memory-budget check loads it), so it is not read twice.
        num_workers: loading threads (default: torch's thread count, which the executor sets to the site's
            ``num_threads``).
    """

    def __init__(self, items: Sequence[Dict[str, str]], transform: Compose, first: Optional[Dict[str, Any]] = None,
                 num_workers: Optional[int] = None) -> None:
        self._first = first
        workers = num_workers or max(1, torch.get_num_threads())
        super().__init__(list(items), transform, num_workers=workers, progress=False, copy_cache=False)
        self._first = None

    def _load_cache_item(self, idx: int) -> Dict[str, Any]:
        if idx == 0 and self._first is not None:
            return self._first
        return _load_one(self.transform, self.data[idx])

    def _transform(self, index: int) -> Dict[str, Any]:
        return self._cache[index]  # every transform ran when the item was cached

    @property
    def loaded_items(self) -> List[Dict[str, Any]]:
        """The loaded ``{"image", "label"}`` items, in datalist order."""
        return list(self._cache)


CACHE_LIMIT_ENV = "MEDFLARE_CACHE_LIMIT_GB"


def item_bytes(item: Dict[str, Any]) -> int:
    """Bytes the tensors of one loaded item take."""
    return sum(v.numel() * v.element_size() for v in item.values() if isinstance(v, torch.Tensor))


def _fits_in_memory(first: Dict[str, Any], n_items: int) -> bool:
    """Whether ``n_items`` items like ``first`` fit the in-memory budget (``$MEDFLARE_CACHE_LIMIT_GB``, default 4)."""
    return item_bytes(first) * n_items <= float(os.environ.get(CACHE_LIMIT_ENV, "4")) * 1024 ** 3


def load_items(items: Sequence[Dict[str, str]], spec: ImageSpec, cache: Any = "auto") -> Dataset:
    """A dataset over ``items``.

    Args:
        items: datalist entries with absolute paths.
        spec: the job's image settings.
        cache: ``True`` loads and checks every item now and keeps it in memory; ``False`` loads lazily (each item
            is checked when read); ``"auto"`` caches when the data fits the memory budget.
    """
    transform = build_transforms(spec)
    items = list(items)
    first = None
    if cache == "auto":
        first = _load_one(transform, items[0]) if items else {}
        cache = _fits_in_memory(first, len(items))
    if not cache:
        return CheckedDataset(items, transform=transform)
    return CheckedCacheDataset(items, transform, first=first)
