"""Aggregation arithmetic as pure functions over ``{parameter name: numpy array}`` dictionaries.

FLARE glue (:mod:`medflare.flare.aggregators`) validates each site's update with :func:`check_update` and combines the
accepted ones with :func:`weighted_average`; algorithms differ only in how they compute the per-site weights
(:func:`sample_weights` for FedAvg/FedProx). A bad update raises :class:`~medflare.common.reports.UpdateError`.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from ..common.reports import UpdateError

Weights = Mapping[str, np.ndarray]


MAX_ABS_VALUE = 1e6
"""Largest magnitude accepted in a floating-point parameter (or difference) of an update. Trained networks on
normalised images stay many orders of magnitude below; a site sending 1e30 is refused instead of averaged in."""

WEIGHTS_KIND = "WEIGHTS"
DIFF_KIND = "WEIGHT_DIFF"


def _kind_matches(value: np.ndarray, ref: np.ndarray, kind: str) -> bool:
    """Floating parameters need floating values; integer ones (counters) integers, or any number in a difference
    (FLARE's privacy filters rescale differences in floating point)."""
    if np.issubdtype(ref.dtype, np.floating):
        return np.issubdtype(value.dtype, np.floating)
    if np.issubdtype(ref.dtype, np.integer):
        allowed = (np.integer, np.floating) if kind == DIFF_KIND else (np.integer,)
        return any(np.issubdtype(value.dtype, t) for t in allowed)
    return value.dtype == ref.dtype


def check_update(site: str, update: Weights, reference: Optional[Weights] = None, partial: bool = False,
                 kind: str = WEIGHTS_KIND, max_abs: Optional[float] = MAX_ABS_VALUE) -> None:
    """Raise :class:`UpdateError` (naming the site and the parameter) if ``update`` cannot be aggregated.

    Args:
        site: name of the sending site (for the message).
        update: the site's parameters (``kind="WEIGHTS"``) or their change from ``reference``
            (``kind="WEIGHT_DIFF"``).
        reference: the global model the site received; the update's keys must be among its keys (all of them unless
            ``partial``), with the same shapes and the same kind of number (floating point for floating parameters:
            an integer array in place of a weight is refused).
        partial: accept a subset of the keys (what FLARE's ``ExcludeVars`` filter leaves).
        kind: ``"WEIGHTS"`` or ``"WEIGHT_DIFF"``.
        max_abs: largest magnitude of a floating-point value (``None``: no limit); NaN and infinity are always
            refused.
    """
    if not update:
        raise UpdateError(f"site '{site}' sent an empty update")
    if not isinstance(update, Mapping):
        raise UpdateError(f"site '{site}' sent an update of type {type(update).__name__}, expected a mapping")
    if reference is not None:
        missing = [] if partial else sorted(set(reference) - set(update))
        extra = sorted(set(update) - set(reference))
        if missing or extra:
            raise UpdateError(f"site '{site}' sent parameters that do not match the global model: "
                              f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, value in update.items():
        try:
            arr = np.asarray(value)
        except Exception as e:  # e.g. ragged nested lists
            raise UpdateError(f"site '{site}': parameter '{name}' is not an array ({e})") from None
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
            raise UpdateError(f"site '{site}': parameter '{name}' has non-numeric type {arr.dtype}")
        if reference is not None:
            ref = np.asarray(reference[name])
            if arr.shape != ref.shape:
                raise UpdateError(f"site '{site}': parameter '{name}' has shape {arr.shape}, "
                                  f"the global model has {ref.shape}")
            if not _kind_matches(arr, ref, kind):
                raise UpdateError(f"site '{site}': parameter '{name}' has type {arr.dtype}, the global model has "
                                  f"{ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.complexfloating):
            if not np.all(np.isfinite(arr)):
                raise UpdateError(f"site '{site}': parameter '{name}' contains NaN or infinite values")
            if np.issubdtype(arr.dtype, np.complexfloating):
                raise UpdateError(f"site '{site}': parameter '{name}' has complex type {arr.dtype}")
            if max_abs is not None and arr.size and float(np.max(np.abs(arr))) > max_abs:
                raise UpdateError(f"site '{site}': parameter '{name}' has values up to "
                                  f"{float(np.max(np.abs(arr))):.3g}, above the accepted magnitude {max_abs:g}")


def to_weights(update: Weights, reference: Weights, kind: str = WEIGHTS_KIND) -> Dict[str, np.ndarray]:
    """The site's parameters for the keys it sent: ``update`` itself for ``WEIGHTS``, ``reference + update``
    (in float64, cast to the reference's dtype; counters rounded) for ``WEIGHT_DIFF``."""
    if kind == WEIGHTS_KIND:
        return dict(update)
    out = {}
    for name, diff in update.items():
        ref = np.asarray(reference[name])
        total = ref.astype(np.float64) + np.asarray(diff, dtype=np.float64)
        out[name] = (np.rint(total) if np.issubdtype(ref.dtype, np.integer) else total).astype(ref.dtype)
    return out


def fill_missing(update: Weights, reference: Weights) -> Dict[str, np.ndarray]:
    """A full set of parameters: the update's, and the reference's for the keys the update left out."""
    return {name: update[name] if name in update else reference[name] for name in reference}


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

    A parameter that only some sites sent (partial updates) is averaged over those sites, with their weights
    renormalised. Integer parameters (counters) are averaged in float and rounded back to their dtype.
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
    names += sorted({n for s in sites[1:] for n in updates[s]} - set(names))
    result: Dict[str, np.ndarray] = {}
    for name in names:
        senders = [site for site in sites if name in updates[site]]
        norm = total if len(senders) == len(sites) else float(sum(weights[s] for s in senders))
        if not norm > 0:
            continue  # only sites of weight 0 sent it: the parameter keeps its global value
        first = np.asarray(updates[senders[0]][name])
        acc = np.zeros(first.shape, dtype=np.float64)
        for site in senders:
            acc += (weights[site] / norm) * np.asarray(updates[site][name], dtype=np.float64)
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
