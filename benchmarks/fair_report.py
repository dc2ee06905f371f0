#!/usr/bin/env python3
"""Tables of the fairness runs (``benchmarks/fair_loop.py --out``), regenerated from the committed records.

    python benchmarks/fair_report.py docs/results/fedism/records.jsonl               # print the tables (test)
    python benchmarks/fair_report.py docs/results/fedism/tuning.jsonl --split val     # a tuning sweep
    python benchmarks/fair_report.py docs/results/fedism/records.jsonl --plots docs/results/fedism
    python benchmarks/loop_report.py --docs     # rewrite every committed tables file and the docs' quotes

Records are grouped by setting (the run's ``tag`` and its sites' qualities) and by method (the job name with its
changed settings, e.g. ``fedism:rho=0.05``; ``local``: every site alone). Every figure is the balanced accuracy of
the model a site deploys after the last round (the final global model; local-only: the site's own model) on its
own **test** split (``--split val``: validation, which alone chose settings). Columns:

- ``mean`` / ``worst``: over sites; mean ± standard deviation over seeds.
- ``clean`` / ``degraded``: the average over the sites of quality ``hq`` / over the others.
- ``global clean`` / ``global corrupted``: the final global model on the benchmark's global test set, rendered
  clean and with the degraded sites' corruptions (test tables only).
- ``Δ ...``: paired difference to the baseline (default ``fedavg_cls``) over the seeds both ran, with its 95% t
  interval; ``*`` where the interval excludes 0.

A per-site table gives each site's figure and its paired difference to the baseline, so that a change of which
site is worst cannot hide a loss. Under the tables of a setting where ``fedism`` ran, the goal of docs/fedism.md
is checked on the figures shown.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "custom"), os.path.join(ROOT, "tools"), os.path.join(ROOT, "benchmarks")]

import loop_report  # noqa: E402
from loop_report import fmt, load_records, paired  # noqa: E402
from jobspec import FAIRNESS_SUITE  # noqa: E402

BASELINE = "fedavg_cls"
FAIR_BASELINES = ("afl", "qfedavg", "fairfed", "fedce", "fedga")
"""The fairness baselines FedISM's goal is measured against (besides FedAvg)."""
CLEAN = "hq"
Runs = Dict[int, Dict[str, Any]]


def is_fairness_record(record: Dict[str, Any]) -> bool:
    """Whether a record was written by ``benchmarks/fair_loop.py``."""
    return "final" in record and "history" in record


def qualities(record: Dict[str, Any]) -> Dict[str, str]:
    return {s: str(q) for s, q in record["history"][0]["quality"].items()}


def setting_key(record: Dict[str, Any]) -> str:
    q = list(qualities(record).values())
    counts = ", ".join(f"{q.count(k)} {k}" for k in dict.fromkeys(q))
    return f"{record.get('tag') or 'fairness'}: {len(q)} sites ({counts}), {record['rounds']} rounds"


def method_order(name: str) -> tuple:
    """Jobs in the suite's order (baseline first), then local-only, each followed by its variants."""
    base = name.split(":")[0]
    order = [*FAIRNESS_SUITE, "local"]
    return (order.index(base) if base in order else len(order), ":" in name, name)


def group(records: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Runs]]:
    """``{setting: {method: {seed: record}}}``, settings in the order first seen, methods by :func:`method_order`
    (a rerun of a seed replaces it)."""
    out: Dict[str, Dict[str, Runs]] = {}
    for r in records:
        out.setdefault(setting_key(r), {}).setdefault(r["method"], {})[int(r["seed"])] = r
    return {k: dict(sorted(v.items(), key=lambda item: method_order(item[0]))) for k, v in out.items()}


def site_scores(record: Dict[str, Any], split: str) -> Dict[str, float]:
    return {s: float(v[split]) for s, v in record["final"].items()}


def figures(record: Dict[str, Any], split: str) -> Dict[str, float]:
    """The row figures of one run."""
    scores = site_scores(record, split)
    quality = qualities(record)
    clean = [v for s, v in scores.items() if quality[s] == CLEAN]
    degraded = [v for s, v in scores.items() if quality[s] != CLEAN]
    out = {"mean": float(np.mean(list(scores.values()))), "worst": float(np.min(list(scores.values())))}
    if clean:
        out["clean"] = float(np.mean(clean))
    if degraded:
        out["degraded"] = float(np.mean(degraded))
    for name, value in (record.get("global_test") or {}).items():
        out[f"global {name}"] = float(value)
    return out


def fmt_diff(d: Optional[Dict[str, float]]) -> str:
    return loop_report.fmt_diff(d) if d else "–"


def main_table(methods: Dict[str, Runs], baseline: str, split: str) -> List[str]:
    columns = ["mean", "worst", "clean", "degraded"] + (["global clean", "global corrupted"] if split == "test" else [])
    deltas = ["mean", "clean", "degraded"]
    lines = ["| method | seeds | " + " | ".join(columns) + " | "
             + " | ".join(f"Δ {c} vs {baseline}" for c in deltas) + " | s/run |",
             "|---|---|" + "---|" * (len(columns) + len(deltas) + 1)]
    base = methods.get(baseline, {})
    for name, runs in methods.items():
        rows = [figures(runs[s], split) for s in sorted(runs)]
        cells = [fmt([r.get(c) for r in rows]) for c in columns]
        if name == baseline or not base:
            cells += ["–"] * len(deltas)
        else:
            cells += [fmt_diff(paired(runs, base, lambda r, c=c: figures(r, split).get(c))) for c in deltas]
        seconds = float(np.mean([runs[s]["seconds"] for s in runs]))
        lines.append(f"| {name} | {','.join(str(s) for s in sorted(runs))} | " + " | ".join(cells)
                     + f" | {seconds:.0f} |")
    return lines


def site_table(methods: Dict[str, Runs], baseline: str, split: str) -> List[str]:
    first = next(iter(next(iter(methods.values())).values()))
    quality = qualities(first)
    sites = list(quality)
    lines = ["| method | " + " | ".join(f"{s} ({quality[s]})" for s in sites) + " |", "|---|" + "---|" * len(sites)]
    base = methods.get(baseline, {})
    for name, runs in methods.items():
        cells = []
        for s in sites:
            cell = fmt([site_scores(runs[k], split)[s] for k in sorted(runs)])
            if name != baseline and base:
                d = paired(runs, base, lambda r, s=s: site_scores(r, split)[s])
                if d:
                    cell += f"; Δ {fmt_diff(d)}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def goal_lines(methods: Dict[str, Runs], baseline: str, split: str, method: str = "fedism") -> List[str]:
    """The goal of docs/fedism.md checked on these runs: ``method``'s degraded sites at least 0.05 above the
    baseline's and 0.03 above every other baseline's, its clean sites within 0.02 of the baseline's."""
    if method not in methods or baseline not in methods:
        return []

    def mean_of(name: str, key: str) -> Optional[float]:
        vals = [figures(r, split).get(key) for r in methods[name].values()]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else None

    mine = mean_of(method, "degraded")
    if mine is None:
        return []
    vs_base = paired(methods[method], methods[baseline], lambda r: figures(r, split).get("degraded"))
    clean = paired(methods[method], methods[baseline], lambda r: figures(r, split).get("clean"))
    others = {n: mean_of(n, "degraded") for n in methods if n in FAIR_BASELINES}
    others = {n: v for n, v in others.items() if v is not None}
    met = bool(vs_base and vs_base["diff"] >= 0.05)
    uncertain = met and vs_base["n"] > 1 and not vs_base["significant"]
    lines = [f"Goal check ({method}, {split} split): degraded sites {fmt_diff(vs_base)} vs {baseline} "
             f"(goal ≥ +0.05): {'met' if met else 'not met'}"
             + (" by the mean, with an interval that includes 0" if uncertain else "")]
    if others:
        best = max(others, key=others.get)
        margin = mine - others[best]
        lines.append(f"; {margin:+.3f} vs the best other baseline, {best} (goal ≥ +0.03): "
                     f"{'met' if margin >= 0.03 else 'not met'}")
    if clean:
        lines.append(f"; clean sites {fmt_diff(clean)} vs {baseline} (goal within 0.02): "
                     f"{'met' if abs(clean['diff']) <= 0.02 else 'not met'}")
    return ["".join(lines) + "."]


def report(records: Sequence[Dict[str, Any]], baseline: str = BASELINE, split: str = "test") -> str:
    """Markdown: per setting, the main table, the per-site table and the goal check, of the ``split`` figures."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    out: List[str] = []
    for setting, methods in group(records).items():
        out += [f"### {setting}", "", *main_table(methods, baseline, split), "",
                f"Per site ({split} balanced accuracy; Δ: paired difference to {baseline}, 95% CI):", "",
                *site_table(methods, baseline, split), ""]
        goal = goal_lines(methods, baseline, split)
        if goal:
            out += [*goal, ""]
    return "\n".join(out).rstrip() + "\n"


def plot(records: Sequence[Dict[str, Any]], out_dir: str) -> List[str]:
    """Per setting: mean and degraded-site test balanced accuracy per round for every method (``curves``), and
    FedISM's aggregation weights and reported sharpness per site and round at its first seed (``weights``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, path: str) -> str:
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    written = []
    for setting, methods in group(records).items():
        slug = setting.split(":")[0].replace(" ", "_")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, runs in methods.items():
            if ":" in name:
                continue
            for ax, pick in ((axes[0], lambda e, q: list(e["test"].values())),
                             (axes[1], lambda e, q: [v for s, v in e["test"].items() if q[s] != CLEAN])):
                curves = [[np.mean(pick(e, qualities(r))) for e in r["history"]] for r in runs.values()]
                ax.plot(np.mean(curves, axis=0), label=name)
        axes[0].set_title(f"{setting}\nmean site test BACC of the received global model", fontsize=8)
        axes[1].set_title("degraded sites", fontsize=8)
        for ax in axes:
            ax.set_xlabel("round")
        axes[0].legend(fontsize=7)
        written.append(save(fig, os.path.join(out_dir, f"{slug}_curves.png")))
        if "fedism" in methods:
            run = methods["fedism"][min(methods["fedism"])]
            fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
            quality = qualities(run)
            for site in run["sites"]:
                axes[0].plot([e["weight"].get(site) for e in run["history"]], label=f"{site} ({quality[site]})")
                axes[1].plot([e["sharpness"].get(site) for e in run["history"]], label=site)
            axes[0].set_title(f"fedism seed {run['seed']}: aggregation weight", fontsize=8)
            axes[1].set_title("reported sharpness of the received global model", fontsize=8)
            axes[1].set_yscale("log")
            axes[0].legend(fontsize=6)
            written.append(save(fig, os.path.join(out_dir, f"{slug}_weights.png")))
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="JSON-lines records of benchmarks/fair_loop.py")
    ap.add_argument("--baseline", default=BASELINE)
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--plots", metavar="DIR", help="also write the curves and weights plots into DIR")
    args = ap.parse_args(argv)
    records = load_records(args.records)
    print(report(records, args.baseline, args.split), end="")
    if args.plots:
        for path in plot(records, args.plots):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
