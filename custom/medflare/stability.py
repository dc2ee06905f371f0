"""Summaries of a per-round metric curve: the last rounds' level and how much it still swings.

Pure functions, used by the server's round report, the comparison runners and the sweep scripts alike.
"""

from __future__ import annotations

from typing import Dict, Sequence

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
