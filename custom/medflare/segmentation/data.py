"""A segmentation site's data: its train, validation and test datasets, from its datalist or the synthetic benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import List, Optional

from monai.data import Dataset

from ..data.checks import check_splits
from ..data.datalist import DataError, ImageSpec, load_items, read_datalist
from ..data.site_config import SiteDataConfig
from .synthetic import SyntheticSegConfig, ensure_site_dataset

__all__ = ["SiteData", "load_site_data"]


@dataclass
class SiteData:
    """A site's training, validation and test datasets and where they came from.

    ``val`` drives model selection; ``test`` is only ever reported. ``test`` is ``None`` when the site's datalist has
    no test list; ``test_note`` then says so, and reports fall back to validation data, marked as such.
    ``warnings`` lists what the site should be told but that does not stop it (e.g. a case listed twice).
    """

    site: str
    modality: Optional[str]
    source: str
    datalist: str
    train: Dataset
    val: Dataset
    test: Optional[Dataset] = None
    test_note: str = ""
    warnings: List[str] = field(default_factory=list)


def load_site_data(config: SiteDataConfig, spec: ImageSpec, synthetic: SyntheticSegConfig,
                   cache_dir: Optional[str] = None) -> SiteData:
    """Load (generating the synthetic part first if needed) and check a site's train, validation and test data.

    Before any image is read, the lists are checked: every listed file inside the site's data root, no case in two
    splits (duplicates within a split are reported in ``warnings``).

    Raises:
        DataError: naming the site and the file at fault.
    """
    try:
        if config.synthetic_index is not None:
            generated = ensure_site_dataset(synthetic, config.synthetic_index, cache_dir)
            datalist, base_dir, cache, root, allow = generated.datalist, None, "auto", None, False
            keys = {"train": "training", "val": "validation", "test": "test"}
        else:
            datalist, base_dir, cache = config.datalist, config.base_dir, config.cache
            root, allow = config.data_root, config.allow_outside_data_root
            keys = {"train": config.train_key, "val": config.val_key, "test": config.test_key}
        test_note = ""
        if not (keys["test"] and _has_list(datalist, keys["test"])):
            keys.pop("test")
            test_note = (f"datalist {datalist} has no '{config.test_key}' list: reports of site '{config.site}' use "
                         "its validation split, which also selects the best model (add a test list for unbiased "
                         "figures)")
        lists = {split: read_datalist(datalist, key, base_dir, root, allow) for split, key in keys.items()}
        warnings = check_splits({keys[s]: [i["image"] for i in items] for s, items in lists.items()},
                                f"datalist {datalist}")
        data = {split: load_items(items, spec, cache) for split, items in lists.items()}
    except DataError as e:
        raise DataError(f"site '{config.site}' ({config.source}): {e}") from None
    return SiteData(site=config.site, modality=config.modality, source=config.source, datalist=datalist,
                    train=data["train"], val=data["val"], test=data.get("test"), test_note=test_note,
                    warnings=[f"site '{config.site}': {w}" for w in warnings])


def _has_list(datalist: str, key: str) -> bool:
    """Whether the datalist holds a non-empty ``key`` list (the datalist itself is checked by the train read)."""
    try:
        with open(datalist) as f:
            raw = json.load(f)
    except (OSError, ValueError):
        return False  # the train read reports the problem with the file
    return isinstance(raw, dict) and bool(raw.get(key))
