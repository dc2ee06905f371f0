"""The run's machine-readable results under ``<run dir>/metrics/`` (pure file handling, no FLARE).

Files:

- ``round_metrics.csv``: one row per round and site: Dice of the global model the site received (per class and
  mean), the site's training loss and sample count, and its local model's Dice after training.
- ``fairness.csv``: one row per round: mean, worst site, std, max-min gap and Jain's index of per-site Dice.
- ``cross_site_dice.csv``: the site-by-model Dice matrix of cross-site evaluation (rows: models, columns: sites).
- ``metrics_summary.json``: all of the above in one document, plus its ``"test"`` section (see
  :func:`held_out_summary`): the figures to report, computed on the sites' test splits.

Model selection (``best_global``) uses validation Dice; every reported figure comes from the ``"test"`` section.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
from typing import Any, Dict, List, Mapping, Optional

from .atomic import atomic_write
from .summaries import fairness_summary
from .summaries import round_stability

METRICS_DIR = "metrics"
SUMMARY_FILE = "metrics_summary.json"

# names CrossSiteModelEval gives the server's models, and the names medflare reports them under
SERVER_MODEL_NAMES = {"SRV_FL_global_model.pt": "global", "SRV_best_FL_global_model.pt": "best_global"}


def write_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    """Write ``rows`` (columns: every key, in order of appearance) as CSV, atomically.

    Cells are quoted where needed (commas, quotes, line breaks in a site or modality name), and text that a
    spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``) is prefixed with ``'``."""
    columns: List[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([_fmt(c) for c in columns])
    for row in rows:
        writer.writerow([_fmt(row.get(c, "")) for c in columns])
    atomic_write(path, lambda f: f.write(out.getvalue()), text=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if isinstance(value, str) and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


class RunSummary:
    """Accumulates per-round and cross-site results of one run and writes them to ``<run_dir>/metrics``."""

    def __init__(self, run_dir: str, key_metric: str = "dice") -> None:
        self.dir = os.path.join(run_dir, METRICS_DIR)
        self.key_metric = key_metric
        path = os.path.join(self.dir, SUMMARY_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self.data: Dict[str, Any] = json.load(f)
        else:
            self.data = {"key_metric": key_metric, "rounds": [], "cross_site": None}

    def add_round(self, round_num: int, sites: Mapping[str, Mapping[str, Any]],
                  aggregation_weights: Optional[Mapping[str, float]] = None) -> Dict[str, Any]:
        """Record one round: ``sites[site]`` holds that site's scalar metrics (must include the key metric).

        A site whose key metric is missing, not a number or not finite (a NaN Dice) is left out of the fairness
        summary and listed under ``"unscored_sites"``; the round is recorded all the same."""
        scores = {s: _score(m.get(self.key_metric)) for s, m in sites.items()}
        valid = {s: v for s, v in scores.items() if v is not None}
        entry = {"round": round_num, "sites": {s: dict(m) for s, m in sorted(sites.items())},
                 "fairness": fairness_summary(valid) if valid else None,
                 "aggregation_weights": dict(aggregation_weights or {})}
        unscored = sorted(s for s, m in sites.items() if self.key_metric in m and scores[s] is None)
        if unscored:
            entry["unscored_sites"] = unscored
        deployed = {s: m["deployed_model"] for s, m in sites.items() if isinstance(m.get("deployed_model"), str)}
        if deployed:
            self.data.setdefault("deployed", {}).update(deployed)
        self.data["rounds"] = [r for r in self.data["rounds"] if r["round"] != round_num] + [entry]
        self.data["rounds"].sort(key=lambda r: r["round"])
        self.save()
        return entry

    def set_cross_site(self, results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Dict[str, Any]:
        """Record cross-site evaluation, given as ``results[data_site][model_owner] = metrics``.

        Sites evaluate on their test split; a site without one evaluates on validation and says so with
        ``on_test_split: 0``, which is recorded in ``validation_only_sites``."""
        matrix: Dict[str, Dict[str, float]] = {}
        validation_only = set()
        for data_site, by_model in results.items():
            for owner, metrics in by_model.items():
                if isinstance(metrics, Mapping) and self.key_metric in metrics:
                    model = SERVER_MODEL_NAMES.get(owner, owner)
                    matrix.setdefault(model, {})[data_site] = float(metrics[self.key_metric])
                    if not metrics.get("on_test_split", 1.0):
                        validation_only.add(data_site)
        sites = sorted({s for row in matrix.values() for s in row})
        local = [m for m in matrix if m not in SERVER_MODEL_NAMES.values()]
        in_site = [matrix[m][m] for m in local if m in matrix[m]]
        off = [v for m in local for s, v in matrix[m].items() if s != m]
        cross = {
            "key_metric": self.key_metric,
            "sites": sites,
            "matrix": matrix,
            "global": fairness_summary(matrix["global"]) if matrix.get("global") else None,
            "best_global": fairness_summary(matrix["best_global"]) if matrix.get("best_global") else None,
            "local_in_site_mean": sum(in_site) / len(in_site) if in_site else None,
            "local_cross_site_mean": sum(off) / len(off) if off else None,
            "validation_only_sites": sorted(validation_only),
        }
        self.data["cross_site"] = cross
        rows = [{"model": m, **{s: matrix[m].get(s, "") for s in sites}} for m in sorted(matrix)]
        write_csv(os.path.join(self.dir, "cross_site_dice.csv"), rows)
        self.save()
        return cross

    def save(self) -> None:
        self.data["test"] = held_out_summary(self.data.get("rounds") or [], self.data.get("cross_site"),
                                             self.key_metric, deployed=self.data.get("deployed"))
        text = json.dumps(self.data, indent=1, sort_keys=True)
        atomic_write(os.path.join(self.dir, SUMMARY_FILE), lambda f: f.write(text), text=True)
        round_rows, fair_rows = [], []
        for entry in self.data["rounds"]:
            for site, metrics in entry["sites"].items():
                round_rows.append({"round": entry["round"], "site": site, **metrics})
            if entry["fairness"]:
                fair_rows.append({"round": entry["round"], **entry["fairness"]})
        if round_rows:
            write_csv(os.path.join(self.dir, "round_metrics.csv"), round_rows)
        if fair_rows:
            write_csv(os.path.join(self.dir, "fairness.csv"), fair_rows)


def format_matrix(matrix: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of a cross-site matrix (rows: models, columns: sites)."""
    sites = sorted({s for row in matrix.values() for s in row})
    lines = ["| model | " + " | ".join(sites) + " |", "|---" * (len(sites) + 1) + "|"]
    for model in sorted(matrix):
        cells = [f"{matrix[model][s]:.3f}" if s in matrix[model] else "" for s in sites]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def held_out_summary(rounds: List[Mapping[str, Any]], cross_site: Optional[Mapping[str, Any]],
                     key_metric: str = "dice", window: int = 5,
                     deployed: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The figures to report, all on test data: ``{split, rounds, global, best_global, matrix, last5, stability,
    deployed}``.

    Args:
        rounds: per-round entries of the summary; a site's ``test_<key_metric>`` is the test score of the global
            model it received that round (the model after ``round`` aggregations).
        cross_site: the cross-site section; its matrix holds test scores when every site has a test split.
        key_metric: the metric reported (``"dice"``).
        window: how many final global models ``last5`` averages (the final model and the ones received in the
            last ``window - 1`` rounds).
        deployed: which model each site deploys, as the sites report it (``deployed_model``): ``"global"`` (the
            final global model, used with the site's own layers where the job keeps any) or ``"personal"`` (the
            site's own model, its row of the cross-site matrix). ``deployed`` in the result gives each site's
            model and its score on the site's own test split, from the cross-site matrix.

    A site without a test split contributes its validation score instead; ``split`` then names those sites, so a
    reader knows that the figures are biased by model selection there.
    """
    test_key = f"test_{key_metric}"
    curve: List[Dict[str, Any]] = []
    val_only = set()
    for entry in rounds:
        scores = {}
        for site, metrics in entry["sites"].items():
            if test_key in metrics:
                if _score(metrics[test_key]) is not None:  # a NaN score leaves the site out of this round
                    scores[site] = _score(metrics[test_key])
            elif _score(metrics.get(key_metric)) is not None:
                scores[site] = _score(metrics[key_metric])
                val_only.add(site)
        if scores:
            curve.append({"round": entry["round"], "model": f"round {entry['round']}", "sites": scores,
                          **mean_and_worst(scores)})
    out: Dict[str, Any] = {"key_metric": key_metric, "rounds": curve, "global": None, "best_global": None,
                           "matrix": None}
    if cross_site and cross_site.get("matrix"):
        matrix = cross_site["matrix"]
        out["matrix"] = matrix
        val_only |= set(cross_site.get("validation_only_sites") or [])
        for name in ("global", "best_global"):
            if matrix.get(name):
                out[name] = mean_and_worst(matrix[name])
        in_site = {}
        for site, kind in sorted((deployed or {}).items()):
            model = site if kind == "personal" else "global"
            if site in matrix.get(model, {}):
                in_site[site] = {"model": model, key_metric: matrix[model][site]}
        if in_site:
            out["deployed"] = {"sites": in_site, **mean_and_worst({s: v[key_metric] for s, v in in_site.items()})}
        if matrix.get("global"):
            final_round = (curve[-1]["round"] + 1) if curve else 0
            curve.append({"round": final_round, "model": "final", "sites": dict(matrix["global"]),
                          **mean_and_worst(matrix["global"])})
    if curve:
        tail = curve[-window:]
        out["last5"] = {"mean": sum(c["mean"] for c in tail) / len(tail),
                        "worst": sum(c["worst"] for c in tail) / len(tail), "n_models": len(tail)}
        out["stability"] = round_stability([c["mean"] for c in curve], window)
    else:
        out["last5"] = out["stability"] = None
    out["split"] = "test" if not val_only else f"validation at {sorted(val_only)} (no test split), test elsewhere"
    return out


def _score(value: Any) -> Optional[float]:
    """``value`` as a float if it is a finite number (not a bool), else ``None``."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def mean_and_worst(scores: Mapping[str, float]) -> Dict[str, float]:
    """Mean and minimum of per-site scores."""
    values = [float(v) for v in scores.values()]
    return {"mean": sum(values) / len(values), "worst": min(values)}
