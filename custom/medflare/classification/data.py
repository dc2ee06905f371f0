"""Which classification data a site uses: resolved at the site, never by editing the job.

Same lookup as segmentation (:mod:`medflare.data.site_config`): ``<site>/local/medflare_site.json``, then the file
named by ``MEDFLARE_SITE_CONFIG``, then the built-in synthetic benchmark (sites ``site-1..site-N``). A config holds
one site's settings or ``{"sites": {"<site>": {...}}}``. A classification site's settings are either

- ``{"synthetic": {"quality": "blur"}}``: a part of the synthetic benchmark (the job's ``synthetic`` settings; the
  site takes the first benchmark site of that quality), or
- a real data source read by :mod:`medflare.classification.loaders`, e.g.
  ``{"format": "image_list", "train": "train.csv", "val": "val.csv"}``,
  ``{"format": "isic", "csv": "labels.csv", "image_dir": "images", "val_fraction": 0.2}``,
  ``{"format": "rsna", "csv": "labels.csv", "dicom_dir": "dicom", "window": [40, 80]}``,
  optionally with ``"global_test": {"clean": <same kind of source>, "corrupted": <source>}`` and the site's own
  held-out test images ``"test": <same kind of source>`` (reported, never used for selection). A nested source
  takes the site's settings it does not set itself (:data:`INHERITED_KEYS`: ``format``, ``data_root``,
  ``allow_outside_data_root``, ``classes``), so ``{"test": {"list": "test.csv"}}`` reads the site's format under
  the site's data root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..data.checks import check_keys, check_splits, config_value
from ..data.datalist import DataError
from ..data.site_config import read_site_config_file, site_entry, synthetic_site_index
from .synthetic import SyntheticClsConfig, class_counts, load_global_test, load_site_arrays
from ..data.placement import TensorDictDataset

# settings of a site's source that its nested ``test`` and ``global_test`` sources take unless they set their own
INHERITED_KEYS = ("format", "data_root", "allow_outside_data_root", "classes")


@dataclass
class ClsSiteData:
    """A site's training/validation/test data, optional global test sets, and where they came from.

    ``test`` (reporting only) is ``None`` for a real-data site without a ``"test"`` source; its reports then fall
    back to validation, flagged. ``warnings`` lists what the site is told but that does not stop it (e.g. a case
    listed twice in one split)."""

    site: str
    source: str
    quality: str
    train: TensorDictDataset
    val: TensorDictDataset
    num_classes: int
    global_test: Dict[str, TensorDictDataset] = field(default_factory=dict)
    test: Optional[TensorDictDataset] = None
    warnings: List[str] = field(default_factory=list)

    @property
    def class_counts(self):
        return class_counts(self.train.labels.numpy(), self.num_classes)


def _read_config(site: str, local_dir: Optional[str]) -> Optional[tuple]:
    found = read_site_config_file(local_dir)
    if found is None:
        return None
    raw, path = found
    return site_entry(raw, site, path), path


def _synthetic(config: SyntheticClsConfig, index: int, site: str, source: str, with_test: bool,
               cache_dir: Optional[str]) -> ClsSiteData:
    arrays = load_site_arrays(config, index, cache_dir)
    test = {}
    if with_test and config.n_test > 0:
        t = load_global_test(config, cache_dir)
        test = {name: TensorDictDataset.from_arrays(t[name], t["labels"]) for name in ("clean", "corrupted")}
    return ClsSiteData(site=site, source=source, quality=config.qualities[index],
                       train=TensorDictDataset.from_arrays(arrays["train_x"], arrays["train_y"]),
                       val=TensorDictDataset.from_arrays(arrays["val_x"], arrays["val_y"]), num_classes=4,
                       global_test=test,
                       test=TensorDictDataset.from_arrays(arrays["test_x"], arrays["test_y"]))


def load_cls_site_data(site: str, local_dir: Optional[str], synthetic: SyntheticClsConfig, num_classes: int = 4,
                       in_channels: int = 1, spatial_size=(64, 64), with_global_test: bool = True,
                       cache_dir: Optional[str] = None) -> ClsSiteData:
    """Resolve and load a site's classification data (see the module docstring).

    Raises:
        DataError: naming the site and the file or key at fault.
    """
    found = _read_config(site, local_dir)
    if found is None:
        index = synthetic_site_index(site, synthetic.n_sites)
        return _synthetic(synthetic, index, site, "built-in synthetic benchmark", with_global_test, cache_dir)
    entry, path = found
    where = f"{path}: site '{site}'"
    if "synthetic" in entry:
        check_keys(entry, {"synthetic"}, path, f"site '{site}'")
        settings = config_value(entry, "synthetic", "object", where, default={})
        check_keys(settings, {"quality"}, path, f"the 'synthetic' settings of site '{site}'")
        quality = settings.get("quality")
        if not isinstance(quality, str) or quality not in synthetic.qualities:
            raise DataError(f"{path}: site '{site}' asks for synthetic quality {quality!r}; "
                            f"this job's benchmark has {list(synthetic.qualities)}")
        return _synthetic(synthetic, list(synthetic.qualities).index(quality), site, path, with_global_test,
                          cache_dir)
    from .loaders import items_dataset, source_lists, source_window

    base = os.path.dirname(os.path.abspath(path))
    try:
        lists, warnings = source_lists(entry, base, num_classes, "settings")
        if not lists.get("val"):
            raise DataError("no validation split: give 'val' (image_list) or a 'val_fraction' > 0")
        sources = {"test": entry["test"]} if entry.get("test") else {}
        if with_global_test:
            global_tests = config_value(entry, "global_test", "object", "settings", default={})
            sources.update({("global", name): spec for name, spec in global_tests.items()})
        held_out = {}
        for key, spec in sources.items():
            label = "'test' source" if key == "test" else f"global_test source '{key[1]}'"
            if not isinstance(spec, dict):
                raise DataError(f"{label}: must be a JSON object (a data source)")
            spec = nested_source(entry, spec)
            held_out[key] = (source_lists({**spec, "val_fraction": 0.0}, base, num_classes, label)[0]["train"],
                             source_window(spec))
        if "test" in held_out:  # the site's own test split must not share a case with its train/val splits
            splits = {k: [p for p, _ in v] for k, v in lists.items()}
            warnings = check_splits({**splits, "test": [p for p, _ in held_out["test"][0]]}, "settings")
        window = source_window(entry)
        train = items_dataset(lists["train"], in_channels, spatial_size, window)
        val = items_dataset(lists["val"], in_channels, spatial_size, window)
        built = {key: items_dataset(items, in_channels, spatial_size, win) for key, (items, win) in held_out.items()}
    except DataError as e:
        raise DataError(f"site '{site}' ({path}): {e}") from None
    return ClsSiteData(site=site, source=path, quality=str(entry.get("quality", "")), train=train, val=val,
                       num_classes=num_classes, test=built.get("test"),
                       global_test={k[1]: v for k, v in built.items() if k != "test"},
                       warnings=[f"site '{site}': {w}" for w in warnings])


def nested_source(site_entry: Dict[str, Any], spec: Dict[str, Any]) -> Dict[str, Any]:
    """A nested ``test``/``global_test`` source completed with the site's :data:`INHERITED_KEYS` it does not set."""
    return {**{k: site_entry[k] for k in INHERITED_KEYS if k in site_entry}, **spec}


def synthetic_config(settings: Optional[Dict[str, Any]]) -> SyntheticClsConfig:
    """The job's ``synthetic`` settings: :class:`SyntheticClsConfig` fields, or the paper-like setting when
    ``n_clients`` is given (``n_clients, n_corrupted, severity, alpha`` + config fields)."""
    settings = dict(settings or {})
    if "n_clients" in settings:
        from .synthetic import paper_setting

        return paper_setting(**settings)
    return SyntheticClsConfig(**settings)
