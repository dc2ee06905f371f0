"""Checks shared by the segmentation and classification data paths (pure functions, no FLARE).

Every check raises :class:`DataError` (also importable from :mod:`medflare.data.datalist`) with a message that
names the site, file or key at fault; checks that only warn return the warnings as strings, which the executors
log.

- typed config values (:func:`config_value`) and unknown keys (:func:`check_keys`): a typo such as ``val_fracton``
  or a value such as ``cache: "no"`` is an error, not a silent default;
- paths listed in a datalist must lie inside the site's data root (:func:`check_inside_root`), unless the site's
  config sets ``allow_outside_data_root: true``;
- no case may be listed in two splits (train/validation/test leakage), and duplicates within a split are reported
  (:func:`check_splits`);
- a DICOM folder must hold one series (:func:`check_dicom_folder`);
- labels are integers, never truncated (:func:`integer_label`).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple



class DataError(ValueError):
    """Raised for bad site data; the message names the site, file or key at fault."""


def root_cause(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain: MONAI wraps an error raised inside a transform (a
    :class:`DataError` of a check, a reader's error) in its own ``RuntimeError``."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error

# names of the value kinds config_value accepts, and what an error message calls them
KINDS = {
    "str": "a string",
    "bool": "true or false",
    "int": "an integer",
    "number": "a number",
    "fraction": "a number in [0, 1)",
    "str_list": "a list of strings",
    "pair": "a list of two numbers",
    "object": "a JSON object",
    "cache": "true, false or \"auto\"",
}

DATA_ROOT_KEYS = ("data_root", "allow_outside_data_root")


def _is_kind(value: Any, kind: str) -> bool:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return is_number and math.isfinite(value)
    if kind == "fraction":
        return is_number and 0.0 <= float(value) < 1.0
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "pair":
        return isinstance(value, list) and len(value) == 2 and all(_is_kind(v, "number") for v in value)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "cache":
        return isinstance(value, bool) or value == "auto"
    raise ValueError(f"unknown value kind {kind!r}")


def config_value(entry: Mapping[str, Any], key: str, kind: str, where: str, default: Any = None,
                 optional: bool = True) -> Any:
    """``entry[key]`` checked to be of ``kind`` (see :data:`KINDS`); ``default`` when absent (or ``null`` and
    ``optional``).

    Raises:
        DataError: ``"<where>: '<key>' must be <kind>, got <value>"``, or that the key is missing.
    """
    value = entry.get(key)
    if value is None:
        if key in entry and not optional:
            raise DataError(f"{where}: '{key}' must be {KINDS[kind]}, got null")
        if key not in entry and not optional:
            raise DataError(f"{where}: '{key}' is required")
        return default
    if not _is_kind(value, kind):
        raise DataError(f"{where}: '{key}' must be {KINDS[kind]}, got {value!r}")
    return value


def check_keys(entry: Mapping[str, Any], allowed: Iterable[str], where: str, owner: str = "") -> None:
    """Refuse keys outside ``allowed`` (typos such as ``val_fracton`` are errors, not silently ignored).

    The message reads ``"<where>: unknown keys [...] for <owner> (allowed: [...])"``."""
    allowed = set(allowed)
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise DataError(f"{where}: unknown keys {unknown}{' for ' + owner if owner else ''} "
                        f"(allowed: {sorted(allowed)})")


def data_root(entry: Mapping[str, Any], base: str, where: str) -> Tuple[Optional[str], bool]:
    """The site's ``data_root`` (resolved against ``base``; ``None`` if not set) and ``allow_outside_data_root``."""
    root = config_value(entry, "data_root", "str", where)
    allow = config_value(entry, "allow_outside_data_root", "bool", where, default=False)
    if root is not None:
        root = os.path.join(base, os.path.expanduser(root))
    return root, allow


def check_inside_root(path: str, root: str, where: str, allow_outside: bool = False) -> None:
    """Refuse ``path`` unless it lies inside ``root`` (both resolved, symbolic links followed).

    A datalist entry such as ``../../etc/passwd`` or an absolute path elsewhere would otherwise make the site read
    (and train on) any file the process can read.
    """
    if allow_outside:
        return
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise DataError(f"{where}: {path} lies outside the site's data root {real_root} (set 'data_root' in the "
                        "site config, or 'allow_outside_data_root': true to allow paths anywhere)")


def check_splits(splits: Mapping[str, Sequence[str]], where: str) -> List[str]:
    """Refuse a case listed in two splits; return a warning per split that lists a case more than once.

    Args:
        splits: split name -> the cases (file paths) it lists; paths are compared after resolving links.
        where: the site/file, for messages.
    """
    warnings: List[str] = []
    owner: Dict[str, str] = {}
    for name, cases in splits.items():
        seen: Dict[str, int] = {}
        for case in cases:
            key = os.path.realpath(case)
            seen[key] = seen.get(key, 0) + 1
            other = owner.get(key)
            if other is not None and other != name:
                raise DataError(f"{where}: {case} is listed in both '{other}' and '{name}' (train/validation/test "
                                "leakage); each case must be in one split only")
            owner[key] = name
        dups = sorted(k for k, n in seen.items() if n > 1)
        if dups:
            warnings.append(f"{where}: the '{name}' split lists {len(dups)} case(s) more than once, e.g. {dups[0]}")
    return warnings


def check_dicom_folder(folder: str) -> None:
    """Refuse a DICOM folder that holds more than one series (they would be stacked into one volume)."""
    import pydicom

    series = set()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:  # not a DICOM file: MONAI's reader decides what to do with it
            continue
        uid = getattr(ds, "SeriesInstanceUID", None)
        if uid is not None:
            series.add(str(uid))
    if len(series) > 1:
        raise DataError(f"DICOM folder {folder} holds {len(series)} series ({', '.join(sorted(series)[:3])}); "
                        "it must hold exactly one (give each series its own folder)")


def integer_label(value: Any, num_classes: int, where: str, classes: Optional[Sequence[str]] = None) -> int:
    """A class index from a list entry: an integer (``3``, ``"3"``, ``3.0``) or a name in ``classes``.

    ``"2.9"`` is an error, never truncated to 2; so are booleans, NaN and values outside ``0..num_classes-1``.
    """
    if classes is not None and str(value) in classes:
        return list(classes).index(str(value))
    label: Optional[int] = None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        label = int(value)
    elif isinstance(value, (str, numbers.Real)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number == int(number):
            label = int(number)
    if label is None:
        raise DataError(f"{where}: label {value!r} is not an integer"
                        + (f" nor one of {list(classes)}" if classes else ""))
    if not 0 <= label < num_classes:
        raise DataError(f"{where}: label {label} outside 0..{num_classes - 1}")
    return label
