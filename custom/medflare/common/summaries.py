"""Summaries of a run's figures: :func:`round_stability` of a per-round metric curve (the last rounds' level and how
much it still swings) and :func:`fairness_summary` of per-site scores (mean, worst site, spread, gap).

Pure functions, used by the server's round report, the comparison runners and the sweep scripts alike.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import numpy as np


def round_stability(values: Sequence[float], window: int = 5) -> Dict[str, float]:
    """Level and round-to-round change of the last ``window`` values of a per-round curve.

    Args:
        values: the metric of the global model, one value per round, in order.
        window: how many final rounds to summarise.

    Returns:
        ``last5_mean`` (mean of the last ``window`` values), ``last5_max_change`` and ``last5_mean_change``
        (largest and mean absolute change between consecutive rounds within those values; 0 with one value).
        The key names keep ``5`` whatever ``window`` is, so reports stay comparable.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    arr = np.asarray(list(values), dtype=float)
    if arr.size == 0:
        raise ValueError("no values to summarise")
    tail = arr[-window:]
    changes = np.abs(np.diff(tail))
    return {"last5_mean": float(tail.mean()),
            "last5_max_change": float(changes.max()) if changes.size else 0.0,
            "last5_mean_change": float(changes.mean()) if changes.size else 0.0}


def fairness_summary(per_site: Mapping[str, float]) -> Dict[str, Any]:
    """Mean, worst and best site, standard deviation, max-min gap and Jain's index of per-site scores.

    Jain's index ``(sum x)^2 / (n * sum x^2)`` is 1 when all sites score the same and ``1/n`` at the most unequal.
    """
    if not per_site:
        raise ValueError("fairness_summary needs at least one site")
    sites = sorted(per_site)
    values = np.array([float(per_site[s]) for s in sites])
    if not np.all(np.isfinite(values)):
        bad = [s for s, v in zip(sites, values) if not math.isfinite(v)]
        raise ValueError(f"non-finite metric from sites {bad}")
    worst, best = int(np.argmin(values)), int(np.argmax(values))
    squares = float(np.sum(values ** 2))
    return {
        "mean": float(values.mean()),
        "worst": float(values[worst]),
        "worst_site": sites[worst],
        "best": float(values[best]),
        "std": float(values.std()),
        "gap": float(values[best] - values[worst]),
        "jain": float(values.sum() ** 2 / (len(values) * squares)) if squares > 0 else 1.0,
        "n_sites": len(values),
    }
