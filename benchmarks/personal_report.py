#!/usr/bin/env python3
"""Tables and plots of personalised federated segmentation (``benchmarks/bare_loop.py`` records), for
docs/personalization.md.

    python benchmarks/personal_report.py docs/results/personalization/records.jsonl
    python benchmarks/personal_report.py docs/results/personalization/tuning.jsonl --split val
    python benchmarks/personal_report.py docs/results/personalization/records.jsonl --plots docs/results/personalization

(``python benchmarks/loop_report.py --docs`` regenerates the committed tables with this module.)

Every figure is a site's Dice on its own split (``test``; ``--split val`` for the tuning records) of the model the
site **deploys** after the last round:

- ``fedavg``: the final global model; ``fedbn``, ``fedlc``, ``feddp``: the final global model with the site's own
  layers (normalisation layers; head and calibration modules); ``ditto``: the site's personal model;
  ``local``: the model the site trained alone for as many epochs as there are rounds;
- ``fedavg + fine-tune``: FedAvg's final global model trained further at the site alone, ``finetune_epochs``
  epochs (the record's ``finetune`` entry); ``ditto (global)``: Ditto's global model, which every site receives.

Columns: mean and worst over sites (mean ± sd over seeds); paired differences, seed by seed, to ``local``, to
``fedavg`` and, where it was run, to ``local40`` (each site alone for 40 epochs: what a site spends under Ditto and
fine-tuning) with 95% t intervals (``*``: the interval excludes 0); then per site the same against ``local`` (does
every hospital gain by joining?) and the *global part* of each method against FedAvg's global model (does the
federation's model stay as good?).
"""

from __future__ import annotations

import argparse
import copy
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

import loop_report as lr

FINE_TUNE = " + fine-tune"
LONGER_LOCAL = "local40"  # sites trained alone for twice the rounds: the budget of Ditto and of fine-tuning
GLOBAL = " (global)"


def is_personal_record(record: Dict[str, Any]) -> bool:
    """A record of the personalisation comparison (Ditto, or a run with the fine-tuning reference)."""
    cfg = record["config"]
    return cfg.get("method") == "ditto" or bool(cfg.get("finetune_epochs"))


def derived_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The records plus the references they carry: ``<method> + fine-tune`` from a record's ``finetune`` entry (its
    last epoch as the final round) and ``ditto (global)`` from Ditto's global-model figures."""
    out = []
    for r in records:
        out.append(r)
        seed = r["config"]["seed"]
        if r.get("finetune"):
            ft = copy.deepcopy(r)
            ft["label"] = f"{lr.method_label(r)}{FINE_TUNE} s{seed}"
            ft["rounds"] = r["rounds"][:-1] + [{"round": r["rounds"][-1]["round"],
                                                **{split: {s: v[-1] for s, v in r["finetune"][split].items()}
                                                   for split in ("val", "test")}}]
            out.append(ft)
        if "global_test" in r["rounds"][-1]:
            g = copy.deepcopy(r)
            g["label"] = f"{lr.method_label(r)}{GLOBAL} s{seed}"
            g["rounds"] = [{"round": e["round"], "val": e["global_val"], "test": e["global_test"]} for e in r["rounds"]]
            out.append(g)
    return out


def is_reference(name: str) -> bool:
    """Sites trained alone (``local``, and ``local40`` with a longer budget): references, not methods."""
    return name.startswith("local")


def mean_of(r: Dict[str, Any]) -> float:
    return float(np.mean(list(lr.final_sites(r).values())))


def worst_of(r: Dict[str, Any]) -> float:
    return float(np.min(list(lr.final_sites(r).values())))


def diff_cell(runs, base, get) -> str:
    d = lr.paired(runs, base, get) if base else None
    return lr.fmt_diff(d) if d else "–"


def main_table(methods: Dict[str, Dict[int, Dict[str, Any]]]) -> List[str]:
    local, fedavg, longer = methods.get("local", {}), methods.get("fedavg", {}), methods.get(LONGER_LOCAL, {})
    lines = ["| deployed model | seeds | mean | worst | Δ mean vs local | Δ worst vs local | Δ mean vs fedavg | "
             "Δ worst vs fedavg |" + (f" Δ mean vs {LONGER_LOCAL} |" if longer else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if longer else "")]
    for name, runs in methods.items():
        recs = [runs[s] for s in sorted(runs)]
        cells = [diff_cell(runs, local, mean_of) if name != "local" else "–",
                 diff_cell(runs, local, worst_of) if name != "local" else "–",
                 diff_cell(runs, fedavg, mean_of) if name != "fedavg" else "–",
                 diff_cell(runs, fedavg, worst_of) if name != "fedavg" else "–"]
        if longer:
            cells.append(diff_cell(runs, longer, mean_of) if name != LONGER_LOCAL else "–")
        lines.append(f"| {name} | {','.join(str(s) for s in sorted(runs))} | {lr.fmt([mean_of(r) for r in recs])} | "
                     f"{lr.fmt([worst_of(r) for r in recs])} | " + " | ".join(cells) + " |")
    return lines


def global_part(methods: Dict[str, Dict[int, Dict[str, Any]]], name: str) -> Optional[str]:
    """The method label whose records hold ``name``'s global part as a site receives it: Ditto's global model, the
    global model itself for FedAvg, the global model with the site's own layers for FedBN, FedLC and FedDP
    (there the shared part is never used without them), that of the method fine-tuned for ``<method> + fine-tune``;
    none for references."""
    if name.endswith(FINE_TUNE):  # fine-tuning changes only what the site deploys
        return global_part(methods, name[:-len(FINE_TUNE)])
    if is_reference(name) or name.endswith(GLOBAL):
        return None
    return f"{name}{GLOBAL}" if f"{name}{GLOBAL}" in methods else name


def goal_lines(methods: Dict[str, Dict[int, Dict[str, Any]]]) -> List[str]:
    """Per method: does every site beat its local-only model (paired interval of the mean excluding 0), and is the
    global part no worse than FedAvg's global model at any site (no significant loss)?"""
    local, fedavg = methods.get("local", {}), methods.get("fedavg", {})
    if not local or not fedavg:
        return []
    sites = next(iter(local.values()))["sites"]
    lines = ["| method | every site above local (Δ mean vs local, CI excludes 0) | global part vs FedAvg at "
             "every site (no significant loss) | goal |", "|---|---|---|---|"]
    for name, runs in methods.items():
        gp = global_part(methods, name)
        if gp is None or name == "fedavg":
            continue
        per_site = {s: lr.paired(runs, local, lambda r, s=s: lr.final_sites(r)[s]) for s in sites}
        d_mean = lr.paired(runs, local, mean_of)
        above = all(d and d["diff"] > 0 for d in per_site.values()) and bool(d_mean and d_mean["low"] > 0)
        losses = [s for s in sites if (d := lr.paired(methods[gp], fedavg, lambda r, s=s: lr.final_sites(r)[s]))
                  and d["high"] < 0]
        lines.append(f"| {name} | {'yes' if above else 'no'} (" + ", ".join(
            f"{s} {per_site[s]['diff']:+.3f}" for s in sites if per_site[s]) + "; mean "
            + (lr.fmt_diff(d_mean) if d_mean else "–") + f") | {'yes' if not losses else 'no: ' + ', '.join(losses)}"
            f" | {'**met**' if above and not losses else 'not met'} |")
    return lines


def report(records: List[Dict[str, Any]], split: str = "test") -> str:
    """Markdown: per benchmark, the deployed-model table, the goal check and the two per-site tables."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    lr.SPLIT = split
    out = []
    for bench, methods in lr.group(derived_records(records)).items():
        out += [f"### {bench}", "", *main_table(methods), ""]
        goal = goal_lines(methods)
        if goal:
            out += ["Goal check:", "", *goal, ""]
        if "local" in methods:
            out += [f"Per site, deployed model ({split} Dice; Δ: paired difference to local, 95% CI):", "",
                    *lr.site_table({k: v for k, v in methods.items() if global_part(methods, k) is not None
                                    or is_reference(k) or k.endswith(FINE_TUNE)}, "local"), ""]
        else:  # e.g. a left-out site: each site's figure
            out += [f"Per site ({split} Dice):", "", *lr.site_table(methods, ""), ""]
        parts = {name: methods[gp] for name in methods if (gp := global_part(methods, name))}
        if "fedavg" in parts and len(parts) > 1:
            out += [f"Per site, global part ({split} Dice; Δ: paired difference to FedAvg's global model, 95% CI):",
                    "", *lr.site_table(parts, "fedavg"), ""]
    return "\n".join(out).rstrip() + "\n"


def plot(records: List[Dict[str, Any]], out_dir: str, split: str = "test") -> List[str]:
    """Per benchmark, ``<variant>_sites.png``: each site's deployed Dice per method (mean over seeds, bars) against
    its local-only model (line); returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr.SPLIT = split
    written = []
    for bench, methods in lr.group(derived_records(records)).items():
        names = [n for n in methods if not n.endswith(GLOBAL)]
        sites = next(iter(methods[names[0]].values()))["sites"]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3.2))
        width = 0.8 / len(sites)
        for j, s in enumerate(sites):
            vals = [float(np.mean([lr.final_sites(r)[s] for r in methods[n].values()])) for n in names]
            ax.bar(np.arange(len(names)) + (j - (len(sites) - 1) / 2) * width, vals, width, label=s)
        ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{split} Dice of the deployed model")
        ax.set_ylim(0, 1)
        ax.set_title(bench, fontsize=9)
        ax.legend(fontsize=7, ncol=len(sites))
        fig.tight_layout()
        path = os.path.join(out_dir, f"{bench.split()[0]}_sites.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="+", help="JSON-lines records of benchmarks/bare_loop.py")
    ap.add_argument("--split", default="test", choices=("test", "val"))
    ap.add_argument("--plots", help="also write the plots into this folder")
    args = ap.parse_args(argv)
    records = lr.load_records(args.records)
    print(report(records, args.split), end="")
    if args.plots:
        for path in plot(records, args.plots, args.split):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
