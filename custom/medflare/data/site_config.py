"""Which data a site trains on: resolved at the site, never by editing the job.

Lookup order (first found wins):

1. ``<site workspace>/local/medflare_site.json``: written by the site admin (templates in ``site_configs/``).
2. The file named by the environment variable ``MEDFLARE_SITE_CONFIG`` (handy for the simulator and POC).
3. Nothing configured: the site generates (once, cached) its part of the built-in synthetic benchmark. This only
   works for the benchmark's site names ``site-1`` ... ``site-N``.

A config file holds either one site's settings, or a mapping ``{"sites": {"<site name>": {...}, ...}}`` so one file
can serve every site of a simulation (the simulator copies ``local/`` to every site). A site's settings are either a
datalist::

    {"datalist": "/data/brats/site-1.json", "base_dir": "/data/brats", "modality": "t1",
     "train_key": "training", "val_key": "validation", "test_key": "test", "cache": "auto"}

``test_key`` names the held-out list used only for reporting (default ``"test"``); a datalist without it still
works, and its reports say they fall back to validation data.

``cache``: ``true`` keeps the loaded data in memory, ``false`` reads it lazily, ``"auto"`` (default) caches when it
fits ``$MEDFLARE_CACHE_LIMIT_GB`` (default 4). Any other value (e.g. ``"no"``) is an error.

Every image and label a datalist lists must lie inside the site's data root: ``data_root`` if given, else
``base_dir``, else the datalist's folder. ``"allow_outside_data_root": true`` lifts the restriction (the site admin's
explicit choice). Unknown keys and values of the wrong type are errors naming the site and the key.

or a synthetic modality, for a custom site name::

    {"synthetic": {"modality": "ct"}}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .checks import DATA_ROOT_KEYS, check_keys, config_value, data_root
from .datalist import DataError

SITE_CONFIG_FILE = "medflare_site.json"
SITE_CONFIG_ENV = "MEDFLARE_SITE_CONFIG"
_DATALIST_KEYS = {"datalist", "base_dir", "modality", "train_key", "val_key", "test_key", "cache", *DATA_ROOT_KEYS}
_SYNTHETIC_KEYS = {"synthetic", "modality"}


@dataclass(frozen=True)
class SiteDataConfig:
    """Resolved data source of one site.

    Exactly one of ``datalist`` and ``synthetic_modality`` is set. ``source`` says where the config came from,
    for logs and error messages.
    """

    site: str
    source: str
    datalist: Optional[str] = None
    base_dir: Optional[str] = None
    train_key: str = "training"
    val_key: str = "validation"
    test_key: str = "test"
    cache: Any = "auto"
    modality: Optional[str] = None
    synthetic_modality: Optional[str] = None
    synthetic_index: Optional[int] = None
    data_root: Optional[str] = None
    allow_outside_data_root: bool = False


def site_entry(raw: Any, site: str, source: str) -> Dict[str, Any]:
    """The settings of ``site`` in a config file (single-site or ``{"sites": {...}}`` form), checked to be an
    object."""
    if not isinstance(raw, dict):
        raise DataError(f"{source}: expected a JSON object")
    entry = raw
    if "sites" in raw:
        extra = set(raw) - {"sites"}
        if extra:
            raise DataError(f"{source}: unknown top-level keys {sorted(extra)} next to 'sites'")
        sites = config_value(raw, "sites", "object", source, optional=False)
        if site not in sites:
            raise DataError(f"unknown site '{site}': {source} lists only {sorted(sites)}")
        entry = sites[site]
    if not isinstance(entry, dict):
        raise DataError(f"{source}: settings of site '{site}' must be a JSON object")
    return entry


def parse_site_config(raw: Dict[str, Any], site: str, source: str,
                      synthetic_modalities: tuple = ()) -> SiteDataConfig:
    """Validate one config (single-site or ``{"sites": ...}`` form) and return the entry of ``site``."""
    entry = site_entry(raw, site, source)
    where = f"{source}: site '{site}'"
    if "synthetic" in entry:
        check_keys(entry, _SYNTHETIC_KEYS, source, f"site '{site}'")
        syn = config_value(entry, "synthetic", "object", where, default={})
        check_keys(syn, {"modality"}, source, f"the 'synthetic' settings of site '{site}'")
        modality = syn.get("modality")
        if modality not in synthetic_modalities:
            raise DataError(f"{source}: site '{site}' asks for synthetic modality {modality!r}; "
                            f"this job's benchmark has {list(synthetic_modalities)}")
        return SiteDataConfig(site=site, source=source, modality=modality, synthetic_modality=modality,
                              synthetic_index=list(synthetic_modalities).index(modality))
    check_keys(entry, _DATALIST_KEYS | {"synthetic"}, source, f"site '{site}'")
    if "datalist" not in entry:
        raise DataError(f"{source}: site '{site}' needs 'datalist' (or 'synthetic')")
    base = os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()
    datalist = os.path.join(base, os.path.expanduser(config_value(entry, "datalist", "str", where, optional=False)))
    base_dir = config_value(entry, "base_dir", "str", where)
    if base_dir is not None:
        base_dir = os.path.join(base, os.path.expanduser(base_dir))
    root, allow_outside = data_root(entry, base, where)
    return SiteDataConfig(site=site, source=source, datalist=datalist, base_dir=base_dir,
                          train_key=config_value(entry, "train_key", "str", where, "training"),
                          val_key=config_value(entry, "val_key", "str", where, "validation"),
                          test_key=config_value(entry, "test_key", "str", where, "test"),
                          cache=config_value(entry, "cache", "cache", where, "auto"),
                          modality=config_value(entry, "modality", "str", where), data_root=root,
                          allow_outside_data_root=allow_outside)


def synthetic_site_index(site: str, n_sites: int) -> int:
    """0-based benchmark index of a site named ``site-k``; raises :class:`DataError` for other names."""
    match = re.fullmatch(r"site-(\d+)", site)
    if not match or not 1 <= int(match.group(1)) <= n_sites:
        raise DataError(
            f"unknown site '{site}': no data config found (put {SITE_CONFIG_FILE} in the site's local/ folder or set "
            f"{SITE_CONFIG_ENV}), and the built-in synthetic benchmark only has sites site-1..site-{n_sites}")
    return int(match.group(1)) - 1


def read_site_config_file(local_dir: Optional[str]) -> Optional[Tuple[Dict[str, Any], str]]:
    """The raw site config and its path: ``<local_dir>/medflare_site.json``, else ``$MEDFLARE_SITE_CONFIG``;
    ``None`` when neither exists."""
    candidates = []
    if local_dir:
        candidates.append(os.path.join(local_dir, SITE_CONFIG_FILE))
    env = os.environ.get(SITE_CONFIG_ENV)
    if env:
        if not os.path.isfile(env):
            raise DataError(f"{SITE_CONFIG_ENV} points to a missing file: {env}")
        candidates.append(env)
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    return json.load(f), path
            except json.JSONDecodeError as e:
                raise DataError(f"site config {path} is not valid JSON: {e}") from e
    return None


def resolve_site_config(site: str, local_dir: Optional[str], synthetic_modalities: tuple) -> SiteDataConfig:
    """Find and validate the data config of ``site`` (see the module docstring for the lookup order)."""
    found = read_site_config_file(local_dir)
    if found is not None:
        raw, path = found
        return parse_site_config(raw, site, path, synthetic_modalities)
    index = synthetic_site_index(site, len(synthetic_modalities))
    return SiteDataConfig(site=site, source="built-in synthetic benchmark", modality=synthetic_modalities[index],
                          synthetic_modality=synthetic_modalities[index], synthetic_index=index)
