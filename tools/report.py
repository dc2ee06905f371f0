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

from medflare.results import SUMMARY_FILE, format_matrix  # noqa: E402


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
    lines = [f"Per round: {key} of the global model each site received (before local training)", ""]
    rounds = summary.get("rounds", [])
    sites = sorted({s for r in rounds for s in r["sites"]})
    lines.append("| round | " + " | ".join(sites) + " | mean | worst | gap |")
    lines.append("|---" * (len(sites) + 4) + "|")
    for r in rounds:
        f = r["fairness"] or {}
        cells = [f"{r['sites'][s].get(key, float('nan')):.3f}" if s in r["sites"] else "" for s in sites]
        lines.append(f"| {r['round']} | " + " | ".join(cells)
                     + f" | {f.get('mean', float('nan')):.3f} | {f.get('worst', float('nan')):.3f} "
                       f"| {f.get('gap', float('nan')):.3f} |")
    cross = summary.get("cross_site")
    if cross:
        lines += ["", f"Cross-site {key} (rows: models, columns: the sites' validation data)", "",
                  format_matrix(cross["matrix"])]
        g = cross.get("global")
        if g:
            lines += ["", f"Final global model: mean {g['mean']:.3f}, worst {g['worst']:.3f} ({g['worst_site']}), "
                          f"std {g['std']:.3f}, gap {g['gap']:.3f}"]
        if cross.get("local_in_site_mean") is not None and cross.get("local_cross_site_mean") is not None:
            lines.append(f"Local models: in-site {cross['local_in_site_mean']:.3f}, "
                         f"on other sites {cross['local_cross_site_mean']:.3f}")
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
