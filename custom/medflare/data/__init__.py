"""Site data: the synthetic benchmark, datalist loading and per-site data configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from monai.data import Dataset

from .datalist import DataError, ImageSpec, load_items, read_datalist
from .site_config import SiteDataConfig, resolve_site_config
from .synthetic import SyntheticSegConfig, ensure_site_dataset

__all__ = ["DataError", "ImageSpec", "SiteData", "SiteDataConfig", "SyntheticSegConfig", "load_site_data",
           "resolve_site_config"]


@dataclass
class SiteData:
    """A site's training and validation datasets and where they came from."""

    site: str
    modality: Optional[str]
    source: str
    datalist: str
    train: Dataset
    val: Dataset


def load_site_data(config: SiteDataConfig, spec: ImageSpec, synthetic: SyntheticSegConfig,
                   cache_dir: Optional[str] = None) -> SiteData:
    """Load (generating the synthetic part first if needed) and check a site's train and validation data.

    Raises:
        DataError: naming the site and the file at fault.
    """
    try:
        if config.synthetic_index is not None:
            generated = ensure_site_dataset(synthetic, config.synthetic_index, cache_dir)
            datalist, base_dir, train_key, val_key, cache = generated.datalist, None, "training", "validation", "auto"
        else:
            datalist, base_dir = config.datalist, config.base_dir
            train_key, val_key, cache = config.train_key, config.val_key, config.cache
        train = load_items(read_datalist(datalist, train_key, base_dir), spec, cache)
        val = load_items(read_datalist(datalist, val_key, base_dir), spec, cache)
    except DataError as e:
        raise DataError(f"site '{config.site}' ({config.source}): {e}") from None
    return SiteData(site=config.site, modality=config.modality, source=config.source, datalist=datalist,
                    train=train, val=val)
