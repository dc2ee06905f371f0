"""Server workflow of the fairness suite: per-round classification fairness report.

:class:`FairnessScatterAndGather` is :class:`~medflare.flare.workflows.MetricsScatterAndGather` with
``key_metric="bacc"`` that adds, every round, to the log, TensorBoard (``fairness/*``, ``fairness_auc/*``, ``test/*``)
and the run's ``metrics/metrics_summary.json`` (``fairness_auc`` and ``global_test`` of each round) plus
``metrics/fairness_cls.csv``:

- the fairness summary of the sites' macro AUC of the global model (the base class summarises balanced accuracy),
- balanced accuracy / AUC of the global model on the global *clean* and *corrupted* test sets (mean over the sites
  that evaluated them) and the clean-minus-corrupted gap.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np
from nvflare.apis.fl_context import FLContext

from ..common.summaries import fairness_summary
from ..common.results import write_csv
from .workflows import MetricsScatterAndGather

FAIRNESS_CSV = "fairness_cls.csv"


def classification_round_report(sites: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """AUC fairness and global test results of one round from the sites' metrics (pure)."""
    out: Dict[str, Any] = {"fairness_auc": None, "global_test": None}
    auc = {s: float(m["auc"]) for s, m in sites.items() if m.get("auc") is not None}
    if auc:
        out["fairness_auc"] = fairness_summary(auc)
    test: Dict[str, float] = {}
    for name in ("clean_bacc", "corrupted_bacc", "clean_auc", "corrupted_auc"):
        values = [float(m[f"test_{name}"]) for m in sites.values() if m.get(f"test_{name}") is not None]
        if values:
            test[name] = float(np.mean(values))
    if "clean_bacc" in test and "corrupted_bacc" in test:
        test["clean_corrupted_gap"] = test["clean_bacc"] - test["corrupted_bacc"]
    out["global_test"] = test or None
    return out


def fairness_rows(rounds: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    rows = []
    for entry in rounds:
        row: Dict[str, Any] = {"round": entry["round"]}
        for prefix, fair in (("bacc", entry.get("fairness")), ("auc", entry.get("fairness_auc"))):
            for k in ("mean", "worst", "worst_site", "std", "gap", "jain"):
                if fair:
                    row[f"{prefix}_{k}"] = fair[k]
        for k, v in (entry.get("global_test") or {}).items():
            row[f"test_{k}"] = v
        rows.append(row)
    return rows


class FairnessScatterAndGather(MetricsScatterAndGather):
    """:class:`MetricsScatterAndGather` for classification (``key_metric="bacc"``) with the fairness report above."""

    def __init__(self, *args: Any, key_metric: str = "bacc", **kwargs: Any) -> None:
        super().__init__(*args, key_metric=key_metric, **kwargs)

    def _report_round(self, fl_ctx: FLContext) -> None:
        super()._report_round(fl_ctx)
        if self._summary is None or not self._site_metrics:
            return
        rnd = self._current_round
        entry: Optional[Dict[str, Any]] = next((r for r in self._summary.data["rounds"] if r["round"] == rnd), None)
        if entry is None:
            return
        extra = classification_round_report(entry["sites"])
        entry.update(extra)
        self._summary.save()
        write_csv(os.path.join(self._summary.dir, FAIRNESS_CSV), fairness_rows(self._summary.data["rounds"]))
        fair, test = extra["fairness_auc"], extra["global_test"]
        if fair:
            self.log_info(fl_ctx, f"round {rnd} AUC fairness: mean={fair['mean']:.4f} worst={fair['worst']:.4f} "
                                  f"({fair['worst_site']}) std={fair['std']:.4f} gap={fair['gap']:.4f}")
        if test:
            self.log_info(fl_ctx, f"round {rnd} global test: " + " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        if self._tb is not None:
            for k in ("mean", "worst", "std", "gap", "jain"):
                if fair:
                    self._tb.add_scalar(f"fairness_auc/{k}", fair[k], rnd)
            for k, v in (test or {}).items():
                self._tb.add_scalar(f"test/{k}", v, rnd)
            self._tb.flush()
