"""Site data both tasks share: a site's data configuration, datalists and their checks, and device placement.

- :mod:`medflare.data.site_config`: which data a site trains on (its ``local/`` config, or the synthetic benchmark).
- :mod:`medflare.data.datalist`: MONAI Decathlon-style datalists read into MONAI datasets, checked.
- :mod:`medflare.data.checks`: the checks on listed files and splits.
- :mod:`medflare.data.placement`: dict datasets of tensors and data-loader settings.

Each task's own datasets are built in :mod:`medflare.segmentation.data` and :mod:`medflare.classification.data`.
"""

from __future__ import annotations

from .datalist import DataError, ImageSpec
from .site_config import SiteDataConfig, resolve_site_config

__all__ = ["DataError", "ImageSpec", "SiteDataConfig", "resolve_site_config"]
