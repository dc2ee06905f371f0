"""Real-data classification sources of a site (read into memory with MONAI's transforms: resized, per-image
z-scored).

Formats (the ``format`` key of a site's settings, see :mod:`medflare.classification.data`); relative paths resolve
against the config file's folder:

``image_list``
    ``{"train": "train.csv", "val": "val.csv"}`` (or one ``"list"`` plus ``"val_fraction"``). A list is a CSV with
    columns ``image,label`` or a JSON list of ``{"image": ..., "label": ...}``; images are PNG/JPEG (MONAI's Pillow
    reader) or NIfTI (its nibabel reader; 2D, or 3D with a single slice); labels are integers
    ``0..num_classes-1``.
``isic``
    ISIC-2019 ground-truth CSV: ``{"csv": ..., "image_dir": ..., "val_fraction": 0.2}``. Column ``image`` names the
    file (``<image_dir>/<image>.jpg``), the other columns are one-hot classes (``classes`` selects and orders them,
    default: every column but ``image`` and ``UNK``); the label is the column holding 1.
``rsna``
    RSNA-ICH-style folder of DICOM slices: ``{"csv": ..., "dicom_dir": ..., "window": [center, width]}``. The CSV is
    either wide (``image,label``; ``label`` an integer or a name from ``classes``) or RSNA's long form (``ID,Label``
    with ``ID = <image>_<subtype>``; the label is the one subtype in ``classes`` marked 1, slices with none or several
    are skipped). Pixels are converted to HU with ``RescaleSlope``/``RescaleIntercept`` and clipped to the window.

Checks (the same as the segmentation path's, :mod:`medflare.data.checks`): unknown keys and values of the wrong
type are errors naming the key; every listed image must lie inside the source's data root (``data_root`` from the
site's settings, else the list's folder, ``image_dir`` or ``dicom_dir``) unless the site sets
``"allow_outside_data_root": true``; images must be 2D (a 3D or 4D volume is refused, never averaged into one image)
with finite values; labels must be integers (``"2.9"`` is refused, never truncated); a case in two splits is refused
and duplicates within a split are reported.

Every problem raises :class:`~medflare.data.DataError` naming the file or key.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from monai.data import NibabelReader, PILReader, PydicomReader
from monai.transforms import Compose, EnsureType, NormalizeIntensity, Resize, ScaleIntensityRange, Transform

from ..data.checks import (DATA_ROOT_KEYS, check_inside_root, check_keys, check_splits, config_value, integer_label,
                           root_cause)
from ..data.datalist import DataError
from ..data.placement import TensorDictDataset

ICH_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")

# keys of a real-data source: every format's, then each format's own (value kinds: medflare.data.checks.KINDS)
COMMON_KEYS = {"format": "str", "val_fraction": "fraction", "split_seed": "int", "classes": "str_list",
               "data_root": "str", "allow_outside_data_root": "bool"}
FORMAT_KEYS = {
    "image_list": {"train": "str", "val": "str", "list": "str"},
    "isic": {"csv": "str", "image_dir": "str", "extension": "str"},
    "rsna": {"csv": "str", "dicom_dir": "str", "window": "pair"},
}
REQUIRED_KEYS = {"image_list": (("train", "list"),), "isic": (("csv",),), "rsna": (("csv",),)}
# keys a site's settings may hold besides its source (see medflare.classification.data)
SITE_KEYS = {"quality": "str", "global_test": "object", "test": "object"}
assert set(DATA_ROOT_KEYS) <= set(COMMON_KEYS)


def check_source(entry: Dict[str, Any], where: str, extra: Optional[Dict[str, str]] = None) -> str:
    """Check a source's keys and value types; returns its format.

    Args:
        entry: the source's settings.
        where: the config file and site, for messages.
        extra: further keys allowed here, with their kinds (a site's own settings: :data:`SITE_KEYS`).
    """
    fmt = config_value(entry, "format", "str", where, optional=False)
    if fmt not in FORMATS:
        raise DataError(f"{where}: unknown data format {fmt!r}; known: {sorted(FORMATS)}")
    kinds = {**COMMON_KEYS, **FORMAT_KEYS[fmt], **(extra or {})}
    check_keys(entry, kinds, where, f"format '{fmt}'")
    for key, kind in kinds.items():
        config_value(entry, key, kind, where)
    for choices in REQUIRED_KEYS[fmt]:
        if not any(entry.get(k) is not None for k in choices):
            raise DataError(f"{where}: format '{fmt}' needs " + " or ".join(f"'{k}'" for k in choices))
    if fmt == "rsna" and entry.get("window") is not None and not float(entry["window"][1]) > 0:
        raise DataError(f"{where}: 'window' must be [center, width] with width > 0, got {entry['window']!r}")
    return fmt


def _path(base: str, p: str) -> str:
    return p if os.path.isabs(p) else os.path.join(base, p)


def _read_table(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise DataError(f"list file not found: {path}")
    try:
        if path.endswith(".json"):
            with open(path) as f:
                rows = json.load(f)
            if not isinstance(rows, list):
                raise DataError(f"{path}: expected a JSON list of {{'image', 'label'}} entries")
            return rows
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read {path}: {e}") from e


GRAY_MODES = ("L", "I", "I;16", "F")
"""Pillow modes read as one grey channel; any other mode (RGB, RGBA, palette...) is read as RGB."""


def _rgb_unless_gray(image: Any) -> Any:
    """Pillow image -> itself if grey, else RGB (the :class:`~monai.data.PILReader` converter)."""
    return image if image.mode in GRAY_MODES else image.convert("RGB")


class ImageChannels(Transform):
    """An image as :class:`ReadImage` gives it, ``(H, W, C)``, -> ``(in_channels, H, W)``: a colour image's channels
    kept or averaged to grey (``in_channels=1``), a grey image repeated; an alpha channel is dropped.

    Args:
        in_channels: channels the model takes.
    """

    def __init__(self, in_channels: int) -> None:
        self.in_channels = in_channels

    def __call__(self, image: Any) -> np.ndarray:
        image = np.asarray(image)
        if image.shape[-1] == 4:
            image = image[..., :3]
        c = image.shape[-1]
        if c == self.in_channels:
            return np.moveaxis(image, -1, 0)
        if self.in_channels == 1:
            return image.mean(axis=-1, keepdims=True).transpose(2, 0, 1)
        if c == 1:
            return np.repeat(np.moveaxis(image, -1, 0), self.in_channels, axis=0)
        raise DataError(f"image has {c} channels, the model takes {self.in_channels}")


class ReadImage(Transform):
    """A file read by one MONAI reader (see :func:`image_reader`), as ``(H, W, C)``.

    There is no fallback to another reader: MONAI's ``LoadImage`` would retry a file its reader cannot read with its
    default readers, which may transpose it. Whether a third axis holds colour channels comes from what was read: a
    Pillow image is grey or RGB (the reader's converter), a DICOM says so in its header (RGB/YBR, or several samples
    per pixel), a NIfTI image is grey. A grey image with a third axis besides singleton ones (a volume, a multi-frame
    DICOM) is refused: averaging its slices into one image would train on an image that does not exist.
    """

    def __init__(self, reader: Any) -> None:
        self.reader = reader

    def __call__(self, path: str) -> np.ndarray:
        read = self.reader.read(path)
        image = np.asarray(self.reader.get_data(read)[0])
        if self._colour(read, image):
            return image
        image = np.squeeze(image)  # a 2D slice may be stored with singleton axes
        if image.ndim == 3:
            raise DataError(f"expected a 2D image, got a volume of shape {image.shape} (3D/4D volumes are not "
                            "averaged into one image: give one slice per entry)")
        if image.ndim != 2:
            raise DataError(f"expected a 2D image, got shape {image.shape}")
        return image[..., None]

    def _colour(self, read: Any, image: np.ndarray) -> bool:
        if isinstance(self.reader, NibabelReader):
            return False
        if isinstance(self.reader, PydicomReader):
            photometric = str(getattr(read, "PhotometricInterpretation", ""))
            return photometric.startswith(("RGB", "YBR")) or int(getattr(read, "SamplesPerPixel", 1) or 1) > 1
        return image.ndim == 3


class FiniteImage(Transform):
    """Refuses an image holding NaN or infinite values."""

    def __call__(self, image: Any) -> np.ndarray:
        image = np.asarray(image, dtype=np.float32)
        if not np.all(np.isfinite(image)):
            raise DataError("image contains NaN or infinite values")
        return image


def image_reader(path: str, window: Optional[Sequence[float]] = None) -> Any:
    """MONAI's reader for ``path`` (NIfTI: nibabel; DICOM, or any file read with a CT window: pydicom; else Pillow),
    in the array order the file holds (Pillow rows first, DICOM rows and columns unswapped, as classifier
    checkpoints were trained)."""
    lower = path.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return NibabelReader()
    if lower.endswith(".dcm") or window is not None:
        return PydicomReader(swap_ij=False, force=True)
    return PILReader(reverse_indexing=False, converter=_rgb_unless_gray)


def classification_transforms(path: str, in_channels: int, spatial_size: Sequence[int],
                              window: Optional[Sequence[float]] = None) -> Compose:
    """The loading transforms of a classification image: read (:class:`ReadImage`), refuse non-finite values, CT
    window to ``[0, 1]`` (if given), channels (:class:`ImageChannels`), bilinear resize to ``spatial_size`` and a
    per-channel z-score; MONAI's transforms throughout, as the segmentation path's."""
    steps: List[Any] = [ReadImage(image_reader(path, window)), FiniteImage()]
    if window is not None:
        center, width = float(window[0]), float(window[1])
        steps.append(ScaleIntensityRange(a_min=center - width / 2, a_max=center + width / 2, b_min=0.0, b_max=1.0,
                                         clip=True))
    steps += [ImageChannels(in_channels),
              Resize(spatial_size=tuple(spatial_size), mode="bilinear", align_corners=False),
              NormalizeIntensity(channel_wise=True),
              EnsureType(data_type="numpy", dtype=np.float32, track_meta=False)]
    return Compose(steps)


def read_image(path: str, in_channels: int, spatial_size: Sequence[int],
               window: Optional[Sequence[float]] = None) -> np.ndarray:
    """One image as ``(in_channels, *spatial_size)`` float32, z-scored per image (after the CT window if given),
    through :func:`classification_transforms`.

    Raises:
        DataError: naming the file: missing or unreadable, not 2D, or holding NaN or infinite values.
    """
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    try:
        return classification_transforms(path, in_channels, spatial_size, window)(path)
    except Exception as e:  # MONAI wraps errors raised inside transforms
        cause = root_cause(e)
        if isinstance(cause, DataError):
            raise DataError(f"{path}: {cause}") from None
        raise DataError(f"cannot read image {path}: {cause}") from e


def _label(value: Any, num_classes: int, classes: Optional[Sequence[str]], where: str) -> int:
    return integer_label(value, num_classes, where, classes)


def _split(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def items_dataset(items: List[Tuple[str, int]], in_channels: int, spatial_size: Sequence[int],
                  window: Optional[Sequence[float]] = None) -> TensorDictDataset:
    """The images and labels of ``(path, label)`` items, read with :func:`read_image`."""
    if not items:
        raise DataError("no images listed")
    images = np.stack([read_image(p, in_channels, spatial_size, window) for p, _ in items])
    return TensorDictDataset.from_arrays(images, np.array([lab for _, lab in items], dtype=np.int64))


def _listed(entry: Dict[str, Any], base: str, path: str, default_root: str, where: str) -> str:
    """``path`` checked to lie in the source's data root (``data_root``, else ``default_root``)."""
    root = entry.get("data_root")
    root = _path(base, os.path.expanduser(root)) if root else default_root
    check_inside_root(path, root, where, bool(entry.get("allow_outside_data_root", False)))
    return path


def _cell(row: Any, key: str, where: str) -> str:
    """A non-empty text cell of a list row."""
    value = row.get(key) if isinstance(row, dict) else None
    if value is None or str(value).strip() == "":
        raise DataError(f"{where}: needs '{key}', got {row!r}")
    return str(value)


def _number(value: Any, where: str) -> float:
    try:
        return float(value or 0)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None


def _image_list(entry: Dict[str, Any], base: str, num_classes: int) -> Dict[str, List[Tuple[str, int]]]:
    def items(key: str) -> List[Tuple[str, int]]:
        path = _path(base, entry[key])
        folder = os.path.dirname(path)
        out = []
        for i, row in enumerate(_read_table(path)):
            where = f"{path} entry {i}"
            image = _listed(entry, base, _path(folder, _cell(row, "image", where)), folder, where)
            out.append((image, _label(_cell(row, "label", where), num_classes, entry.get("classes"), where)))
        return out

    if "train" in entry:
        return {"train": items("train"), "val": items("val") if "val" in entry else []}
    return {"all": items("list")}


def _isic(entry: Dict[str, Any], base: str, num_classes: int) -> Dict[str, List[Tuple[str, int]]]:
    path = _path(base, entry["csv"])
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    classes = entry.get("classes") or [c for c in rows[0] if c not in ("image", "UNK")]
    if len(classes) != num_classes:
        raise DataError(f"{path}: {len(classes)} class columns {classes}, the job has {num_classes} classes")
    missing = [c for c in ["image", *classes] if c not in rows[0]]
    if missing:
        raise DataError(f"{path}: missing columns {missing}")
    image_dir = _path(base, entry.get("image_dir", "."))
    out = []
    for i, row in enumerate(rows):
        where = f"{path} row {i + 2}"
        image = _cell(row, "image", where)
        hot = [_number(row[c], f"{where} ({image}), column {c}") for c in classes]
        if sorted(hot)[-1] != 1.0 or sum(hot) != 1.0:
            raise DataError(f"{where} ({image}): not one-hot over {classes}")
        name = image if os.path.splitext(image)[1] else image + entry.get("extension", ".jpg")
        out.append((_listed(entry, base, os.path.join(image_dir, name), image_dir, where), int(np.argmax(hot))))
    return {"all": out}


def _rsna(entry: Dict[str, Any], base: str, num_classes: int) -> Dict[str, List[Tuple[str, int]]]:
    path = _path(base, entry["csv"])
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    dicom_dir = _path(base, entry.get("dicom_dir", "."))
    classes = entry.get("classes") or (list(ICH_SUBTYPES) if num_classes == len(ICH_SUBTYPES) else None)

    def file_of(image: str, where: str) -> str:
        name = image if image.lower().endswith(".dcm") else image + ".dcm"
        return _listed(entry, base, os.path.join(dicom_dir, name), dicom_dir, where)

    if "image" in rows[0] and "label" in rows[0]:
        out = []
        for i, r in enumerate(rows):
            where = f"{path} row {i + 2}"
            out.append((file_of(_cell(r, "image", where), where),
                        _label(_cell(r, "label", where), num_classes, classes, where)))
        return {"all": out}
    if "ID" not in rows[0] or "Label" not in rows[0]:
        raise DataError(f"{path}: expected columns image,label or RSNA's ID,Label")
    if not classes:
        raise DataError(f"{path}: the long RSNA form needs 'classes' (subtype names)")
    positives: Dict[str, List[int]] = {}
    for i, r in enumerate(rows):
        where = f"{path} row {i + 2}"
        image, _, subtype = _cell(r, "ID", where).rpartition("_")
        positives.setdefault(image, [])
        if subtype in classes and _number(r.get("Label"), where) == 1.0:
            positives[image].append(classes.index(subtype))
    out = [(file_of(img, path), labs[0]) for img, labs in sorted(positives.items()) if len(labs) == 1]
    if not out:
        raise DataError(f"{path}: no slice has exactly one positive subtype among {classes}")
    return {"all": out}


FORMATS = {"image_list": _image_list, "isic": _isic, "rsna": _rsna}


def source_lists(entry: Dict[str, Any], base: str, num_classes: int,
                 where: str = "data source") -> Tuple[Dict[str, List[Tuple[str, int]]], List[str]]:
    """The ``{"train": [(path, label)...], "val": [...]}`` lists of a real-data source (validation may be a
    ``val_fraction`` split of one list), checked (keys, types, data root, labels, no case in both), and the
    warnings about duplicates. No image is read."""
    fmt = check_source(entry, where, SITE_KEYS)
    lists = FORMATS[fmt](entry, base, num_classes)
    if "all" in lists:
        items = lists["all"]
        frac = float(entry.get("val_fraction", 0.2))
        train_idx, val_idx = _split(len(items), frac, int(entry.get("split_seed", 0)))
        lists = {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}
    warnings = check_splits({k: [p for p, _ in v] for k, v in lists.items()}, where)
    return lists, warnings


def source_window(entry: Dict[str, Any]) -> Optional[Sequence[float]]:
    """The CT window a source's images are read with (RSNA: ``window``, default the brain window 40/80)."""
    if entry.get("format") != "rsna":
        return None
    return entry.get("window") or (40.0, 80.0)


def load_source(entry: Dict[str, Any], base: str, num_classes: int, in_channels: int,
                spatial_size: Sequence[int]) -> Tuple[TensorDictDataset, Optional[TensorDictDataset]]:
    """Train and validation datasets of a real-data source (validation may be a ``val_fraction`` split)."""
    lists, _ = source_lists(entry, base, num_classes)
    window = source_window(entry)
    train = items_dataset(lists["train"], in_channels, spatial_size, window)
    val = items_dataset(lists["val"], in_channels, spatial_size, window) if lists.get("val") else None
    return train, val
