#!/usr/bin/env python3
"""Print the results of a medflare run: per-round Dice and fairness, and the cross-site Dice matrix.

    python tools/report.py workspaces/fedavg             # a simulator workspace
    python tools/report.py results/<job_id>/workspace    # a downloaded POC/production job
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom"))

from medflare.common.results import SUMMARY_FILE, format_matrix  # noqa: E402


def find_summary(path: str) -> str:
    """The metrics summary under ``path`` (a workspace, a run dir or the file itself)."""
    if os.path.isfile(path):
        return path
    hits = sorted(glob.glob(os.path.join(path, "**", "metrics", SUMMARY_FILE), recursive=True))
    if not hits:
        raise SystemExit(f"no metrics/{SUMMARY_FILE} under {path}: did the run finish?")
    return hits[0]


def render(summary: dict) -> str:
    key = summary.get("key_metric", "dice")
    test = summary.get("test") or {}
    split = test.get("split", "validation")
    lines = [f"Per round: {key} of the global model each site received (before local training), "
             f"on validation (selects the best model) and on {split} (reported)", ""]
    rounds = summary.get("rounds", [])
    sites = sorted({s for r in rounds for s in r["sites"]})
    test_by_round = {c["round"]: c for c in test.get("rounds") or []}
    lines.append("| round | " + " | ".join(f"{s} val" for s in sites) + " | val mean | "
                 + " | ".join(f"{s} test" for s in sites) + " | test mean | test worst |")
    lines.append("|---" * (2 * len(sites) + 4) + "|")
    nan = float("nan")
    for r in rounds:
        f = r["fairness"] or {}
        t = test_by_round.get(r["round"], {})
        cells = [f"{r['sites'][s].get(key, nan):.3f}" if s in r["sites"] else "" for s in sites]
        tcells = [f"{t['sites'][s]:.3f}" if s in t.get("sites", {}) else "" for s in sites]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + f" | {f.get('mean', nan):.3f} | "
                     + " | ".join(tcells) + f" | {t.get('mean', nan):.3f} | {t.get('worst', nan):.3f} |")
    cross = summary.get("cross_site")
    if cross:
        lines += ["", f"Cross-site {key} (rows: models, columns: the sites' {split} data)", "",
                  format_matrix(cross["matrix"])]
        if cross.get("local_in_site_mean") is not None and cross.get("local_cross_site_mean") is not None:
            lines.append(f"Local models: in-site {cross['local_in_site_mean']:.3f}, "
                         f"on other sites {cross['local_cross_site_mean']:.3f}")
    if test.get("global"):
        lines += ["", f"Reported ({split}):"]
        for name, label in (("global", "final global model"), ("best_global", "best global model (chosen on "
                                                                               "validation)")):
            if test.get(name):
                lines.append(f"- {label}: mean {test[name]['mean']:.3f}, worst site {test[name]['worst']:.3f}")
        if test.get("last5"):
            last = test["last5"]
            lines.append(f"- mean over the last {last['n_models']} global models: mean {last['mean']:.3f}, "
                         f"worst site {last['worst']:.3f}")
        if test.get("stability"):
            lines.append(f"- largest round-to-round change of the mean over them: "
                         f"{test['stability']['last5_max_change']:.3f}")
    deployed = test.get("deployed")
    if deployed:
        lines += ["", f"Deployed models ({split} {key} of the model each site uses on its own data):"]
        for site, entry in sorted(deployed["sites"].items()):
            model = "its personal model" if entry["model"] == site else \
                "the final global model (with the site's own layers where the job keeps any)"
            lines.append(f"- {site}: {model}, {entry[key]:.3f}")
        lines.append(f"- mean {deployed['mean']:.3f}, worst site {deployed['worst']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="simulator workspace, downloaded job folder, or metrics_summary.json")
    args = parser.parse_args()
    path = find_summary(args.path)
    with open(path) as f:
        summary = json.load(f)
    print(f"# {path}\n")
    print(render(summary))


if __name__ == "__main__":
    main()
