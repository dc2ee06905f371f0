"""Aggregation arithmetic as pure functions over ``{parameter name: numpy array}`` dictionaries.

FLARE glue (:mod:`medflare.aggregators`) validates each site's update with :func:`check_update` and combines the
accepted ones with :func:`weighted_average`; algorithms differ only in how they compute the per-site weights
(:func:`sample_weights` for FedAvg/FedProx).
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

Weights = Mapping[str, np.ndarray]


class UpdateError(ValueError):
    """A site's update cannot be aggregated; the message names the site and the parameter."""


def check_update(site: str, update: Weights, reference: Optional[Weights] = None) -> None:
    """Raise :class:`UpdateError` if ``update`` has non-finite values or does not match ``reference``.

    Args:
        site: name of the sending site (for the message).
        update: the site's parameters.
        reference: the global model the site received; keys and shapes must match it.
    """
    if not update:
        raise UpdateError(f"site '{site}' sent an empty update")
    if reference is not None:
        missing = sorted(set(reference) - set(update))
        extra = sorted(set(update) - set(reference))
        if missing or extra:
            raise UpdateError(f"site '{site}' sent parameters that do not match the global model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in update.items():
        arr = np.asarray(value)
        if reference is not None and arr.shape != np.asarray(reference[name]).shape:
            raise UpdateError(f"site '{site}': parameter '{name}' has shape {arr.shape}, "
                              f"the global model has {np.asarray(reference[name]).shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise UpdateError(f"site '{site}': parameter '{name}' contains NaN or infinite values")


def sample_weights(n_samples: Mapping[str, float]) -> Dict[str, float]:
    """FedAvg weights ``n_i / sum_j n_j``."""
    if not n_samples:
        raise ValueError("no sites to weight")
    bad = {s: n for s, n in n_samples.items() if not np.isfinite(n) or n <= 0}
    if bad:
        raise ValueError(f"sample counts must be positive, got {bad}")
    total = float(sum(n_samples.values()))
    return {site: float(n) / total for site, n in n_samples.items()}


def weighted_average(updates: Mapping[str, Weights], weights: Mapping[str, float]) -> Dict[str, np.ndarray]:
    """``sum_i weights[i] * updates[i]`` per parameter; ``weights`` are normalised to sum to 1 first.

    Integer parameters (counters) are averaged in float and rounded back to their dtype.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    if set(updates) != set(weights):
        raise ValueError(f"weights given for {sorted(weights)} but updates from {sorted(updates)}")
    total = float(sum(weights.values()))
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"aggregation weights must sum to a positive number, got {dict(weights)}")
    sites = sorted(updates)
    names = list(updates[sites[0]].keys())
    result: Dict[str, np.ndarray] = {}
    for name in names:
        first = np.asarray(updates[sites[0]][name])
        acc = np.zeros(first.shape, dtype=np.float64)
        for site in sites:
            acc += (weights[site] / total) * np.asarray(updates[site][name], dtype=np.float64)
        if np.issubdtype(first.dtype, np.integer):
            result[name] = np.rint(acc).astype(first.dtype)
        else:
            result[name] = acc.astype(first.dtype)
    return result


def weight_difference(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """``new - old`` key by key (float64 differences cast back to ``new``'s dtype)."""
    missing = sorted(set(new) - set(old))
    if missing:
        raise UpdateError(f"the global model lacks parameters {missing[:5]} of the aggregate")
    return {k: (np.asarray(new[k], dtype=np.float64) - np.asarray(old[k], dtype=np.float64)).astype(
        np.asarray(new[k]).dtype) for k in new}
