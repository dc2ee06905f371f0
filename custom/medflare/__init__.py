"""medflare: federated medical-image segmentation and fairness algorithms for NVIDIA FLARE.

The package is laid out by role, the way NVFlare's ``app_common`` and MONAI group code. Lower layers never import
higher ones, and nothing outside :mod:`medflare.flare` imports FLARE at module level:

- :mod:`medflare.keys`: the names sites and server agree on (message meta keys, reported statistics).
- :mod:`medflare.common`: what sites, server and tools share: atomic file writes, checks of the numbers a site
  reports, the run's result files, summaries of curves and per-site figures.
- :mod:`medflare.data`: a site's data configuration, datalists and their checks, device placement.
- :mod:`medflare.segmentation`: segmentation networks, local training, Dice metrics, augmentation, the synthetic
  benchmarks (blobs, anatomy) and a site's segmentation datasets.
- :mod:`medflare.classification`: the same for the fairness suite's classifiers.
- :mod:`medflare.algorithms`: the methods' math as plain functions and trainers: aggregation, fairness rules, robust
  rules, the FedDA relay order, SAM/GSAM, alignment losses, feature statistics, personalisation.
- :mod:`medflare.networks`: the one registry of networks by name (:func:`medflare.networks.build_model`).
- :mod:`medflare.artefacts`: trained-model artefacts: provenance records, trained-model export, MONAI bundles,
  inference.
- :mod:`medflare.flare`: the FLARE glue: executors, aggregators, workflows, persistors, widgets, the server
  optimiser, resume and site policy.

Job generation lives in ``tools/`` (``jobspec.py``, ``flare_config.py``) and benchmark-only analysis in
``benchmarks/``; neither is shipped to sites.

Module paths from before this layout (``medflare.workflows``, ``medflare.executors``, ``medflare.persistors``...)
keep working: job configs, resume files and user code that name them import the module at its new place
(:data:`MOVED_MODULES`). The few functions and classes that moved between modules are listed in the README's layout
section.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Dict, Optional

__version__ = "0.1.0"

MOVED_MODULES: Dict[str, str] = {
    "medflare.aggregation": "medflare.algorithms.aggregation",
    "medflare.alignment": "medflare.algorithms.alignment",
    "medflare.fairness": "medflare.algorithms.fairness",
    "medflare.feature_stats": "medflare.algorithms.feature_stats",
    "medflare.personalization": "medflare.algorithms.personalization",
    "medflare.relay": "medflare.algorithms.relay",
    "medflare.robust": "medflare.algorithms.robust",
    "medflare.sam": "medflare.algorithms.sam",
    "medflare.atomic": "medflare.common.atomic",
    "medflare.reports": "medflare.common.reports",
    "medflare.results": "medflare.common.results",
    "medflare.stability": "medflare.common.summaries",
    "medflare.aggregators": "medflare.flare.aggregators",
    "medflare.fair_aggregators": "medflare.flare.fairness_aggregators",
    "medflare.workflows": "medflare.flare.workflows",
    "medflare.classification.reporting": "medflare.flare.fairness_workflow",
    "medflare.persistors": "medflare.flare.persistors",
    "medflare.widgets": "medflare.flare.widgets",
    "medflare.server_opt": "medflare.flare.server_optimizer",
    "medflare.resume": "medflare.flare.resume",
    "medflare.site_policy": "medflare.flare.site_policy",
    "medflare.site_view": "medflare.flare.site_view",
    "medflare.executors": "medflare.flare.executors",
    "medflare.executors.base": "medflare.flare.executors.base",
    "medflare.executors.segmentation": "medflare.flare.executors.segmentation",
    "medflare.executors.alignment": "medflare.flare.executors.alignment",
    "medflare.executors.classification": "medflare.flare.executors.classification",
    "medflare.executors.ditto": "medflare.flare.executors.ditto",
    "medflare.executors.support": "medflare.flare.executors.support",
    "medflare.training": "medflare.segmentation.training",
    "medflare.metrics": "medflare.segmentation.metrics",
    "medflare.augment": "medflare.segmentation.augment",
    "medflare.data.synthetic": "medflare.segmentation.synthetic",
    "medflare.data.anatomy": "medflare.segmentation.anatomy",
    "medflare.provenance": "medflare.artefacts.provenance",
    "medflare.trained_model": "medflare.artefacts.trained_model",
    "medflare.bundle": "medflare.artefacts.bundle",
    "medflare.inference": "medflare.artefacts.inference",
    "medflare.inference.inputs": "medflare.artefacts.inference.inputs",
    "medflare.inference.segmentation": "medflare.artefacts.inference.segmentation",
    "medflare.inference.classification": "medflare.artefacts.inference.classification",
}
"""Old module path -> its module now. Importing an old path gives the very module object of the new one, so a class
named by either path is the same class (FLARE's component builder, ``isinstance`` checks and pickled references
agree)."""


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves the old module paths of :data:`MOVED_MODULES` to the modules at their new places."""

    def find_spec(self, fullname: str, path: Optional[object] = None, target: Optional[object] = None):
        if fullname not in MOVED_MODULES:
            return None
        new = importlib.util.find_spec(MOVED_MODULES[fullname])
        is_package = new is not None and new.submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, self, is_package=is_package)

    def __init__(self) -> None:
        self._own_specs: Dict[str, object] = {}

    def create_module(self, spec):
        module = importlib.import_module(MOVED_MODULES[spec.name])
        self._own_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the module at the new place is already executed; the import system has just set its __spec__ to the old
        # name's, so give it back its own
        module.__spec__ = self._own_specs.pop(module.__spec__.name, module.__spec__)


def _install_finder() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())


_install_finder()
