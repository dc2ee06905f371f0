"""Robust aggregation (pure functions): norm clipping of each site's update, then a weighted mean, a trimmed mean or
a coordinate-wise median.

Every medflare aggregator takes the rule as its ``robust`` argument (off by default), e.g.::

    {"id": "aggregator", "path": "medflare.flare.aggregators.WeightedAggregator",
     "args": {"robust": {"clip_norm": 5.0, "method": "trimmed_mean", "trim": 1}}}

``clip_norm``: a site's change ``w_i - w`` (all floating-point parameters it sent, as one vector) longer than this
is scaled down to this length. Averaging clipped changes with weights that sum to 1 moves the model by at most
``clip_norm``, whatever one site sends. ``method``: ``"mean"`` keeps the algorithm's own weights;
``"trimmed_mean"`` drops, per coordinate, the ``trim`` largest and ``trim`` smallest values and averages the rest
without weights; ``"median"`` takes the coordinate-wise median. With ``trim`` >= the number of malicious sites (and
more honest sites than that), every coordinate of a trimmed mean lies between the honest sites' values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .aggregation import Weights, weighted_average

METHODS = ("mean", "trimmed_mean", "median")


@dataclass(frozen=True)
class RobustRule:
    """How updates are combined robustly (see the module docstring)."""

    clip_norm: Optional[float] = None
    method: str = "mean"
    trim: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"robust method must be one of {METHODS}, got {self.method!r}")
        if self.clip_norm is not None and not (np.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"robust clip_norm must be a positive number or null, got {self.clip_norm!r}")
        if not isinstance(self.trim, int) or isinstance(self.trim, bool) or self.trim < 0:
            raise ValueError(f"robust trim must be an integer >= 0, got {self.trim!r}")

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]]) -> Optional["RobustRule"]:
        """``None`` (no robust rule) or the rule described by a job config's ``robust`` object."""
        if config is None:
            return None
        if not isinstance(config, Mapping):
            raise ValueError(f"robust must be an object such as {{'clip_norm': 5.0, 'method': 'median'}}, got "
                             f"{config!r}")
        unknown = sorted(set(config) - {"clip_norm", "method", "trim"})
        if unknown:
            raise ValueError(f"robust: unknown keys {unknown} (known: clip_norm, method, trim)")
        return cls(**dict(config))

    @property
    def uses_weights(self) -> bool:
        return self.method == "mean"


def _float_keys(update: Weights) -> List[str]:
    return [k for k in update if np.issubdtype(np.asarray(update[k]).dtype, np.floating)]


def update_norm(update: Weights, reference: Weights) -> float:
    """Euclidean norm of ``update - reference`` over the floating-point parameters in ``update``."""
    total = 0.0
    for k in _float_keys(update):
        total += float(np.sum((np.asarray(update[k], np.float64) - np.asarray(reference[k], np.float64)) ** 2))
    return float(np.sqrt(total))


def clip_update(update: Weights, reference: Weights, max_norm: float) -> Tuple[Dict[str, np.ndarray], float]:
    """``update`` with its change from ``reference`` scaled to norm ``max_norm`` if longer; and the original norm.
    Integer parameters (counters) are left as they are."""
    norm = update_norm(update, reference)
    if norm <= max_norm:
        return dict(update), norm
    scale = max_norm / norm
    out = dict(update)
    for k in _float_keys(update):
        ref = np.asarray(reference[k], np.float64)
        out[k] = (ref + scale * (np.asarray(update[k], np.float64) - ref)).astype(np.asarray(update[k]).dtype)
    return out, norm


def trimmed_mean(values: np.ndarray, trim: int) -> np.ndarray:
    """Coordinate-wise mean of ``values`` (sites along axis 0) without the ``trim`` largest and smallest values
    of each coordinate; the median when fewer than ``2 trim + 1`` values remain."""
    n = values.shape[0]
    if n <= 2 * trim:
        return np.median(values, axis=0)
    ordered = np.sort(values, axis=0)
    return ordered[trim:n - trim].mean(axis=0)


def robust_average(updates: Mapping[str, Weights], weights: Mapping[str, float], reference: Weights,
                   rule: RobustRule) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Combine site parameters by ``rule``. Returns the combined parameters (keys some site sent) and the norm of
    each site's change before clipping."""
    norms: Dict[str, float] = {}
    clipped: Dict[str, Dict[str, np.ndarray]] = {}
    for site in sorted(updates):
        if rule.clip_norm is not None:
            clipped[site], norms[site] = clip_update(updates[site], reference, rule.clip_norm)
        else:
            clipped[site], norms[site] = dict(updates[site]), update_norm(updates[site], reference)
    if rule.method == "mean":
        return weighted_average(clipped, weights), norms
    out: Dict[str, np.ndarray] = {}
    keys = sorted({k for u in clipped.values() for k in u})
    for key in keys:
        stack = np.stack([np.asarray(u[key], np.float64) for u in clipped.values() if key in u])
        combined = np.median(stack, axis=0) if rule.method == "median" else trimmed_mean(stack, rule.trim)
        dtype = np.asarray(reference[key]).dtype
        out[key] = (np.rint(combined) if np.issubdtype(dtype, np.integer) else combined).astype(dtype)
    return out, norms
