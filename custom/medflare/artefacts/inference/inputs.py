"""Which images to apply a trained model to: cases found from a path (pure file handling, no torch).

Segmentation (:func:`segmentation_cases`): a NIfTI file; a folder of NIfTI files; a DICOM series folder (one case);
a folder of DICOM series folders (one case each); or a Decathlon-style datalist (its ``test`` list by default, or
any list; entries are ``{"image": ..., "label": ...}`` with an optional label, or plain image paths).

Classification (:func:`classification_cases`): an image list (CSV with an ``image`` column and an optional
``label`` column, or a JSON list of such entries); an ISIC-style CSV (``image`` plus one-hot class columns; the
class columns give the class names and, when every row is one-hot, the labels); a folder of DICOM files or of
PNG/JPEG/NIfTI images.

Every problem raises :class:`~medflare.data.DataError` naming the file.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ...data.datalist import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")
NON_CLASS_COLUMNS = ("image", "label", "UNK")


@dataclass(frozen=True)
class Case:
    """One input: an image file or DICOM series folder, and its ground truth when known.

    Attributes:
        image: path of the image file or DICOM series folder.
        label: segmentation: path of the label map; classification: the class index as a string; ``None`` if
            unknown.
    """

    image: str
    label: Optional[str] = None

    @property
    def name(self) -> str:
        """The image's name without folder and extension (what output files are named after)."""
        base = os.path.basename(os.path.normpath(self.image))
        for suffix in (".nii.gz", *IMAGE_SUFFIXES):
            if base.lower().endswith(suffix):
                return base[: -len(suffix)]
        return base


def _exists(path: str, what: str, listed_in: Optional[str] = None) -> str:
    if not os.path.exists(path):
        where = f" listed in {listed_in}" if listed_in else ""
        raise DataError(f"{what}{where} not found: {path}")
    return path


def is_dicom_file(path: str) -> bool:
    """Whether ``path`` is a DICOM file (``.dcm``, or the ``DICM`` marker at byte 128)."""
    if path.lower().endswith(".dcm"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _files(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if not f.startswith(".") and os.path.isfile(os.path.join(folder, f)))


def _subfolders(folder: str) -> List[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if os.path.isdir(os.path.join(folder, f)))


def read_segmentation_datalist(path: str, key: str = "test", base_dir: Optional[str] = None) -> List[Case]:
    """Cases of list ``key`` of a Decathlon-style datalist; relative paths resolve against ``base_dir`` (default:
    the datalist's folder)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read datalist {path}: {e}") from e
    if not isinstance(raw, dict) or not raw.get(key):
        keys = sorted(raw) if isinstance(raw, dict) else []
        raise DataError(f"datalist {path} has no (or an empty) '{key}' list (lists: {keys}); choose one with --key")
    base = base_dir or os.path.dirname(os.path.abspath(path))
    cases = []
    for i, entry in enumerate(raw[key]):
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            raise DataError(f"datalist {path}: '{key}' entry {i} needs an 'image' path, got {entry!r}")
        image = _exists(os.path.join(base, entry["image"]), "image", path)
        label = entry.get("label")
        cases.append(Case(image, _exists(os.path.join(base, label), "label", path) if label else None))
    return cases


def segmentation_cases(path: str, key: str = "test", base_dir: Optional[str] = None) -> List[Case]:
    """The segmentation cases of ``path`` (see the module docstring).

    Args:
        path: a NIfTI file, a folder, or a datalist (``.json``).
        key: the datalist's list to read.
        base_dir: folder the datalist's relative paths resolve against.
    """
    _exists(path, "input")
    if os.path.isfile(path):
        if path.lower().endswith(".json"):
            return read_segmentation_datalist(path, key, base_dir)
        if path.lower().endswith(NIFTI_SUFFIXES):
            return [Case(path)]
        raise DataError(f"{path}: not a NIfTI file (.nii, .nii.gz) nor a datalist (.json); give a DICOM series "
                        "as its folder")
    files = _files(path)
    nifti = [f for f in files if f.lower().endswith(NIFTI_SUFFIXES)]
    if nifti:
        return [Case(f) for f in nifti]
    if any(is_dicom_file(f) for f in files):
        return [Case(path)]
    series = [d for d in _subfolders(path) if any(is_dicom_file(f) for f in _files(d))]
    if series:
        return [Case(d) for d in series]
    raise DataError(f"{path}: no NIfTI files, DICOM series or DICOM series folders in this folder")


def _one_hot_label(row: Dict[str, str], classes: Sequence[str]) -> Optional[str]:
    try:
        hot = [float(row.get(c) or 0) for c in classes]
    except ValueError:
        return None
    return str(hot.index(1.0)) if sorted(hot)[-1] == 1.0 and sum(hot) == 1.0 else None


def read_image_table(path: str, image_dir: Optional[str] = None,
                     extension: str = ".jpg") -> Tuple[List[Case], Optional[List[str]]]:
    """Cases of an image list or ISIC-style CSV, and the class names its columns give (``None`` for a list).

    Args:
        path: a CSV (``image`` column, optional ``label`` or one-hot class columns) or a JSON list.
        image_dir: folder of the images (default: the list's folder).
        extension: appended to ``image`` values without one (ISIC lists name images without ``.jpg``).
    """
    try:
        if path.lower().endswith(".json"):
            with open(path) as f:
                rows = json.load(f)
        else:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
    except (OSError, ValueError, csv.Error) as e:
        raise DataError(f"cannot read image list {path}: {e}") from e
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and r.get("image") for r in rows):
        raise DataError(f"{path}: expected a non-empty list whose entries all name an 'image'")
    folder = image_dir or os.path.dirname(os.path.abspath(path))
    classes = [c for c in rows[0] if c not in NON_CLASS_COLUMNS] or None
    labels: List[Optional[str]] = [None] * len(rows)
    if "label" in rows[0]:
        labels = [str(r["label"]) if r.get("label") not in (None, "") else None for r in rows]
    elif classes:
        labels = [_one_hot_label(r, classes) for r in rows]
        labels = labels if all(lab is not None for lab in labels) else [None] * len(rows)
    cases = []
    for row, label in zip(rows, labels):
        name = str(row["image"])
        name = name if os.path.splitext(name)[1] else name + extension
        cases.append(Case(_exists(os.path.join(folder, name), "image", path), label))
    return cases, classes


def classification_cases(path: str, image_dir: Optional[str] = None,
                         extension: str = ".jpg") -> Tuple[List[Case], Optional[List[str]]]:
    """The classification cases of ``path`` and the class names it gives, if any (see the module docstring)."""
    _exists(path, "input")
    if os.path.isfile(path):
        if path.lower().endswith((".csv", ".json")):
            return read_image_table(path, image_dir, extension)
        return [Case(path)], None
    images = [f for f in _files(path) if f.lower().endswith(IMAGE_SUFFIXES) or is_dicom_file(f)]
    if not images:
        raise DataError(f"{path}: no DICOM, PNG/JPEG or NIfTI images in this folder")
    return [Case(f) for f in images], None

