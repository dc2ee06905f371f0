"""Site data: the synthetic benchmark, datalist loading and per-site data configuration."""

from __future__ import annotations

from dataclasses import dataclass
import json
from typing import Optional

from monai.data import Dataset

from .datalist import DataError, ImageSpec, load_items, read_datalist
from .site_config import SiteDataConfig, resolve_site_config
from .synthetic import SyntheticSegConfig, ensure_site_dataset

__all__ = ["DataError", "ImageSpec", "SiteData", "SiteDataConfig", "SyntheticSegConfig", "load_site_data",
           "resolve_site_config"]


@dataclass
class SiteData:
    """A site's training, validation and test datasets and where they came from.

    ``val`` drives model selection; ``test`` is only ever reported. ``test`` is ``None`` when the site's datalist has
    no test list; ``test_note`` then says so, and reports fall back to validation data, marked as such.
    """

    site: str
    modality: Optional[str]
    source: str
    datalist: str
    train: Dataset
    val: Dataset
    test: Optional[Dataset] = None
    test_note: str = ""


def load_site_data(config: SiteDataConfig, spec: ImageSpec, synthetic: SyntheticSegConfig,
                   cache_dir: Optional[str] = None) -> SiteData:
    """Load (generating the synthetic part first if needed) and check a site's train, validation and test data.

    Raises:
        DataError: naming the site and the file at fault.
    """
    try:
        if config.synthetic_index is not None:
            generated = ensure_site_dataset(synthetic, config.synthetic_index, cache_dir)
            datalist, base_dir, cache = generated.datalist, None, "auto"
            train_key, val_key, test_key = "training", "validation", "test"
        else:
            datalist, base_dir = config.datalist, config.base_dir
            train_key, val_key, test_key, cache = config.train_key, config.val_key, config.test_key, config.cache
        train = load_items(read_datalist(datalist, train_key, base_dir), spec, cache)
        val = load_items(read_datalist(datalist, val_key, base_dir), spec, cache)
        test, test_note = None, ""
        if test_key and _has_list(datalist, test_key):
            test = load_items(read_datalist(datalist, test_key, base_dir), spec, cache)
        else:
            test_note = (f"datalist {datalist} has no '{test_key}' list: reports of site '{config.site}' use its "
                         "validation split, which also selects the best model (add a test list for unbiased figures)")
    except DataError as e:
        raise DataError(f"site '{config.site}' ({config.source}): {e}") from None
    return SiteData(site=config.site, modality=config.modality, source=config.source, datalist=datalist,
                    train=train, val=val, test=test, test_note=test_note)


def _has_list(datalist: str, key: str) -> bool:
    """Whether the datalist holds a non-empty ``key`` list (the datalist itself is checked by the train read)."""
    with open(datalist) as f:
        return bool(json.load(f).get(key))
