"""The one registry of every network medflare builds by name: segmentation networks and classifiers.

Jobs, checkpoints (their provenance record), trained-model exports and MONAI bundles name a network by its registry
name and constructor arguments; :func:`build_model` builds it. The networks themselves live with their task:
:mod:`medflare.segmentation.networks` and :mod:`medflare.classification.models` (both re-exported here, where the
classes were before the package was laid out by role, so that configs naming ``medflare.networks.FeatureUNet`` keep
working).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from .classification.models import CLASSIFIER_REGISTRY
from .segmentation.networks import (SEGMENTATION_REGISTRY, CalibratedUNet, DomainHeadUNet, FeatureUNet, head_keys,
                                    norm_layer_keys)

__all__ = ["MODEL_REGISTRY", "build_model", "CalibratedUNet", "DomainHeadUNet", "FeatureUNet", "head_keys",
           "norm_layer_keys"]

MODEL_REGISTRY: Dict[str, Callable[..., nn.Module]] = {**SEGMENTATION_REGISTRY, **CLASSIFIER_REGISTRY}
"""Every network a job, a checkpoint or a command line names: the segmentation networks
(:data:`medflare.segmentation.networks.SEGMENTATION_REGISTRY`) and the classifiers of the fairness suite
(:data:`medflare.classification.models.CLASSIFIER_REGISTRY`)."""


def build_model(name: str = "unet", **kwargs: Any) -> nn.Module:
    """Build a registered network by name (``MODEL_REGISTRY``); ``kwargs`` go to its constructor."""
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model '{name}'; available: {sorted(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[name](**kwargs)
