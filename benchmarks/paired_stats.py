"""Paired comparison of two methods over seeds: mean difference, 95% interval, significance (pure functions).

Runs of two methods with the same seed share the benchmark data and the initial model, so their difference per
seed is the fair unit of comparison; the interval is the paired t interval over seeds.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

# two-sided 95% quantiles of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(dof: int) -> float:
    """Two-sided 95% quantile of Student's t with ``dof`` degrees of freedom (table; conservative between rows)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    rows = [d for d in sorted(_T975) if d <= dof]
    return _T975[rows[-1]] if dof <= 120 else 1.960


def paired_difference(method: Sequence[float], baseline: Sequence[float]) -> Dict[str, float]:
    """Mean of ``method - baseline`` over paired seeds, with its 95% t interval.

    Returns ``{"diff", "low", "high", "n", "significant"}``; ``significant`` is 1.0 when the interval excludes 0.
    With one pair the interval is undefined (``low``/``high`` are NaN, not significant).
    """
    if len(method) != len(baseline):
        raise ValueError(f"paired comparison needs equal lengths, got {len(method)} and {len(baseline)}")
    if not method:
        raise ValueError("no pairs to compare")
    diffs = [float(a) - float(b) for a, b in zip(method, baseline)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"diff": mean, "low": math.nan, "high": math.nan, "n": 1, "significant": 0.0}
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    return {"diff": mean, "low": low, "high": high, "n": n, "significant": float(low > 0 or high < 0)}
