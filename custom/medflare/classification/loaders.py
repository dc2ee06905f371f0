"""Real-data classification sources of a site (read into memory, resized, per-image z-scored).

Formats (the ``format`` key of a site's settings, see :mod:`medflare.classification.data`); relative paths resolve
against the config file's folder:

``image_list``
    ``{"train": "train.csv", "val": "val.csv"}`` (or one ``"list"`` plus ``"val_fraction"``). A list is a CSV with
    columns ``image,label`` or a JSON list of ``{"image": ..., "label": ...}``; images are PNG/JPEG (Pillow) or
    NIfTI (nibabel; 2D, or 3D with a single slice); labels are integers ``0..num_classes-1``.
``isic``
    ISIC-2019 ground-truth CSV: ``{"csv": ..., "image_dir": ..., "val_fraction": 0.2}``. Column ``image`` names the
    file (``<image_dir>/<image>.jpg``), the other columns are one-hot classes (``classes`` selects and orders them,
    default: every column but ``image`` and ``UNK``); the label is the column holding 1.
``rsna``
    RSNA-ICH-style folder of DICOM slices: ``{"csv": ..., "dicom_dir": ..., "window": [center, width]}``. The CSV is
    either wide (``image,label``; ``label`` an integer or a name from ``classes``) or RSNA's long form (``ID,Label``
    with ``ID = <image>_<subtype>``; the label is the one subtype in ``classes`` marked 1, slices with none or several
    are skipped). Pixels are converted to HU with ``RescaleSlope``/``RescaleIntercept`` and clipped to the window.

Every problem raises :class:`~medflare.data.DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..data.datalist import DataError
from .training import ArrayDataset

ICH_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


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


def _resize(image: np.ndarray, spatial_size: Sequence[int]) -> np.ndarray:
    t = torch.as_tensor(image, dtype=torch.float32)[None]
    if tuple(t.shape[-2:]) != tuple(spatial_size):
        t = torch.nn.functional.interpolate(t, size=tuple(spatial_size), mode="bilinear", align_corners=False)
    return t[0].numpy()


def _zscore(image: np.ndarray) -> np.ndarray:
    out = image.astype(np.float32)
    for c in range(out.shape[0]):
        out[c] = (out[c] - out[c].mean()) / (out[c].std() + 1e-8)
    return out


def _channels(image: np.ndarray, in_channels: int, path: str) -> np.ndarray:
    """``(H, W)`` or ``(H, W, C)`` -> ``(in_channels, H, W)``."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise DataError(f"{path}: expected a 2D image, got shape {image.shape}")
    if image.shape[-1] == 4:
        image = image[..., :3]
    c = image.shape[-1]
    if c == in_channels:
        return np.moveaxis(image, -1, 0)
    if in_channels == 1:
        return image.mean(axis=-1, keepdims=True).transpose(2, 0, 1)
    if c == 1:
        return np.repeat(np.moveaxis(image, -1, 0), in_channels, axis=0)
    raise DataError(f"{path}: image has {c} channels, the model takes {in_channels}")


def read_image(path: str, in_channels: int, spatial_size: Sequence[int],
               window: Optional[Sequence[float]] = None) -> np.ndarray:
    """One image as ``(in_channels, *spatial_size)`` float32, z-scored per image (after the CT window if given)."""
    if not os.path.isfile(path):
        raise DataError(f"image not found: {path}")
    lower = path.lower()
    try:
        if lower.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asarray(nib.load(path).get_fdata(), dtype=np.float32)
            arr = np.squeeze(arr)
        elif lower.endswith(".dcm") or window is not None:
            import pydicom

            ds = pydicom.dcmread(path)
            arr = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1.0)) + float(
                getattr(ds, "RescaleIntercept", 0.0))
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "I", "I;16", "F") else im,
                                 dtype=np.float32)
    except DataError:
        raise
    except Exception as e:  # corrupt or unsupported file
        raise DataError(f"cannot read image {path}: {e}") from e
    if window is not None:
        center, width = float(window[0]), float(window[1])
        arr = (np.clip(arr, center - width / 2, center + width / 2) - (center - width / 2)) / width
    return _zscore(_resize(_channels(arr, in_channels, path), spatial_size))


def _label(value: Any, num_classes: int, classes: Optional[Sequence[str]], where: str) -> int:
    if classes is not None and str(value) in classes:
        return list(classes).index(str(value))
    try:
        label = int(float(value))
    except (TypeError, ValueError):
        raise DataError(f"{where}: label {value!r} is not an integer" +
                        (f" nor one of {list(classes)}" if classes else "")) from None
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside 0..{num_classes - 1}")
    return label


def _split(n: int, val_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


def _dataset(items: List[Tuple[str, int]], in_channels: int, spatial_size, window=None) -> ArrayDataset:
    if not items:
        raise DataError("no images listed")
    images = np.stack([read_image(p, in_channels, spatial_size, window) for p, _ in items])
    return ArrayDataset(images, np.array([lab for _, lab in items], dtype=np.int64))


def _image_list(entry: Dict[str, Any], base: str, num_classes: int) -> Dict[str, List[Tuple[str, int]]]:
    def items(key: str) -> List[Tuple[str, int]]:
        path = _path(base, entry[key])
        rows = _read_table(path)
        out = []
        for i, row in enumerate(rows):
            if "image" not in row or "label" not in row:
                raise DataError(f"{path}: entry {i} needs 'image' and 'label'")
            out.append((_path(os.path.dirname(path), str(row["image"])),
                        _label(row["label"], num_classes, entry.get("classes"), f"{path} entry {i}")))
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
        hot = [float(row[c] or 0) for c in classes]
        if sorted(hot)[-1] != 1.0 or sum(hot) != 1.0:
            raise DataError(f"{path} row {i + 2} ({row['image']}): not one-hot over {classes}")
        name = row["image"] if os.path.splitext(row["image"])[1] else row["image"] + entry.get("extension", ".jpg")
        out.append((os.path.join(image_dir, name), int(np.argmax(hot))))
    return {"all": out}


def _rsna(entry: Dict[str, Any], base: str, num_classes: int) -> Dict[str, List[Tuple[str, int]]]:
    path = _path(base, entry["csv"])
    rows = _read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    dicom_dir = _path(base, entry.get("dicom_dir", "."))
    classes = entry.get("classes") or (list(ICH_SUBTYPES) if num_classes == len(ICH_SUBTYPES) else None)

    def file_of(image: str) -> str:
        return os.path.join(dicom_dir, image if image.lower().endswith(".dcm") else image + ".dcm")

    if "image" in rows[0] and "label" in rows[0]:
        return {"all": [(file_of(r["image"]), _label(r["label"], num_classes, classes, f"{path} row {i + 2}"))
                        for i, r in enumerate(rows)]}
    if "ID" not in rows[0] or "Label" not in rows[0]:
        raise DataError(f"{path}: expected columns image,label or RSNA's ID,Label")
    if not classes:
        raise DataError(f"{path}: the long RSNA form needs 'classes' (subtype names)")
    positives: Dict[str, List[int]] = {}
    for r in rows:
        image, _, subtype = r["ID"].rpartition("_")
        positives.setdefault(image, [])
        if subtype in classes and float(r["Label"]) == 1.0:
            positives[image].append(classes.index(subtype))
    out = [(file_of(img), labs[0]) for img, labs in sorted(positives.items()) if len(labs) == 1]
    if not out:
        raise DataError(f"{path}: no slice has exactly one positive subtype among {classes}")
    return {"all": out}


FORMATS = {"image_list": _image_list, "isic": _isic, "rsna": _rsna}


def load_source(entry: Dict[str, Any], base: str, num_classes: int, in_channels: int,
                spatial_size: Sequence[int]) -> Tuple[ArrayDataset, Optional[ArrayDataset]]:
    """Train and validation datasets of a real-data source (validation may be a ``val_fraction`` split)."""
    fmt = entry.get("format")
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; known: {sorted(FORMATS)}")
    window = entry.get("window") if fmt == "rsna" else None
    if fmt == "rsna" and window is None:
        window = (40.0, 80.0)  # brain window
    lists = FORMATS[fmt](entry, base, num_classes)
    if "all" in lists:
        items = lists["all"]
        frac = float(entry.get("val_fraction", 0.2))
        train_idx, val_idx = _split(len(items), frac, int(entry.get("split_seed", 0)))
        lists = {"train": [items[i] for i in train_idx], "val": [items[i] for i in val_idx]}
    train = _dataset(lists["train"], in_channels, spatial_size, window)
    val = _dataset(lists["val"], in_channels, spatial_size, window) if lists.get("val") else None
    return train, val
