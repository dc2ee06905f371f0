#!/usr/bin/env python3
"""Compare the fairness suite (FedISM, FedISM+ and six baselines) on the synthetic quality-shift benchmark.

Every method is its job folder (``jobs/<method>``), run in the FLARE simulator with the same data, model, seed and
schedule; only ``--rounds``, the benchmark size and the seed are changed. Finished runs are skipped, so an
interrupted sweep resumes where it stopped.

    python benchmarks/compare_fairness.py --out results/fairness --seeds 0 1 2 --rounds 12
    python benchmarks/compare_fairness.py --out /tmp/f20 --setting paper --n-clients 20 --methods fedism --seeds 0

Scores of a run are the mean over its last ``--last`` rounds (FFL4MIA averages its last rounds) of what the sites
report for the global model they receive: balanced accuracy on each site's held-out split (mean, worst site, std,
max-min gap), and balanced accuracy on the global clean and corrupted test sets with their gap. Writes
``<out>/results.md``, ``<out>/results.csv`` (mean +- std over seeds) and ``<out>/curves.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "custom"), os.path.join(ROOT, "tools")]

from jobtools import copy_job, run_simulator  # noqa: E402

METHODS = ("fedavg_cls", "afl", "qfedavg", "fairfed", "fedce", "fedga", "fedism", "fedism_plus")
COLUMNS = ("bacc_mean", "bacc_worst", "bacc_std", "bacc_gap", "auc_mean", "test_clean", "test_corrupted",
           "clean_corrupted_gap")


def prepare_run(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], n_clients: int,
                out: str) -> Optional[str]:
    """Copy the job for one run (all copies are made before the first run, so editing the code during a sweep does
    not change it); returns None if the run already finished."""
    run_dir = os.path.join(out, "runs", method, f"seed{seed}")
    if os.path.isfile(os.path.join(run_dir, "record.json")):
        return None
    job_root = os.path.join(run_dir, "job")
    if os.path.isdir(job_root):
        import shutil

        shutil.rmtree(job_root)
    os.makedirs(run_dir, exist_ok=True)
    job = copy_job(method, job_root, num_rounds=rounds,
                   client_args={"synthetic": {**synthetic, "seed": seed}, "seed": seed},
                   server_args={"min_clients": n_clients}, component_args={"persistor": {"seed": seed}})
    with open(os.path.join(job, "meta.json")) as f:
        meta = json.load(f)
    meta["min_clients"] = n_clients
    with open(os.path.join(job, "meta.json"), "w") as f:
        json.dump(meta, f)
    return job


def run_one(method: str, seed: int, rounds: int, n_clients: int, threads: int, out: str) -> Dict[str, Any]:
    run_dir = os.path.join(out, "runs", method, f"seed{seed}")
    record_path = os.path.join(run_dir, "record.json")
    if os.path.isfile(record_path):
        with open(record_path) as f:
            return json.load(f)
    job = os.path.join(run_dir, "job", method)
    ws = os.path.join(run_dir, "ws")
    start = time.time()
    proc = run_simulator(job, ws, n_clients=n_clients, threads=threads,
                         env={"MEDFLARE_CACHE_DIR": os.path.join(out, "cache")})
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (rc {proc.returncode}); see {ws}.out")
    with open(os.path.join(ws, "server", "simulate_job", "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    record = {"method": method, "seed": seed, "rounds": rounds, "seconds": round(seconds, 1),
              "summary_rounds": summary["rounds"], "cross_site": summary.get("cross_site")}
    with open(record_path, "w") as f:
        json.dump(record, f)
    return record


def scores(record: Dict[str, Any], last: int) -> Dict[str, float]:
    """Mean over the last ``last`` rounds of the round-level fairness numbers."""
    rounds = record["summary_rounds"][-last:]
    values: Dict[str, List[float]] = {c: [] for c in COLUMNS}
    for entry in rounds:
        fair, auc, test = entry.get("fairness") or {}, entry.get("fairness_auc") or {}, entry.get("global_test") or {}
        for k in ("mean", "worst", "std", "gap"):
            if k in fair:
                values[f"bacc_{k}"].append(fair[k])
        if "mean" in auc:
            values["auc_mean"].append(auc["mean"])
        for src, dst in (("clean_bacc", "test_clean"), ("corrupted_bacc", "test_corrupted"),
                         ("clean_corrupted_gap", "clean_corrupted_gap")):
            if src in test:
                values[dst].append(test[src])
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def aggregate(records: Sequence[Dict[str, Any]], methods: Sequence[str], last: int) -> List[Dict[str, Any]]:
    rows = []
    for method in methods:
        runs = [scores(r, last) for r in records if r["method"] == method]
        if not runs:
            continue
        row: Dict[str, Any] = {"method": method, "n_seeds": len(runs),
                               "seconds": float(np.mean([r["seconds"] for r in records if r["method"] == method]))}
        for c in COLUMNS:
            vals = [r[c] for r in runs if c in r]
            if vals:
                row[c] = float(np.mean(vals))
                row[f"{c}_sd"] = float(np.std(vals))
        rows.append(row)
    return rows


def write_tables(rows: List[Dict[str, Any]], out: str, command: str) -> str:
    header = ["method", "seeds", *COLUMNS, "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], str(row["n_seeds"])]
        cells += [f"{row[c]:.3f} ± {row[c + '_sd']:.3f}" if c in row else "" for c in COLUMNS]
        cells.append(f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Regenerate: `{command}`\n\n{text}\n")
    with open(os.path.join(out, "results.csv"), "w") as f:
        cols = ["method", "n_seeds", "seconds"] + [x for c in COLUMNS for x in (c, c + "_sd")]
        f.write(",".join(cols) + "\n")
        for row in rows:
            f.write(",".join(str(row.get(c, "")) for c in cols) + "\n")
    return text


def plot(records: Sequence[Dict[str, Any]], methods: Sequence[str], out: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        for ax, getter, title in (
                (axes[0], lambda e: (e.get("fairness") or {}).get("mean"), "mean site BACC"),
                (axes[1], lambda e: (e.get("fairness") or {}).get("worst"), "worst site BACC"),
                (axes[2], lambda e: (e.get("global_test") or {}).get("corrupted_bacc"), "corrupted test BACC")):
            curves = [[getter(e) for e in r["summary_rounds"]] for r in runs]
            n = min(len(c) for c in curves)
            arr = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)
            ax.plot(np.nanmean(arr, axis=0), label=method)
            ax.set_title(title)
            ax.set_xlabel("round")
    axes[0].legend(fontsize=7)
    path = os.path.join(out, "curves.png")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--last", type=int, default=3, help="rounds averaged into a run's score")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=64)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--setting", choices=("quality", "paper"), default="quality",
                        help="quality: 4 sites hq/blur/noisy/lowres; paper: N clients, last k with Gaussian noise")
    parser.add_argument("--n-clients", type=int, default=20)
    parser.add_argument("--n-corrupted", type=int, default=4)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="simulator threads (0: one per client)")
    args = parser.parse_args(argv)
    synthetic: Dict[str, Any] = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    n_clients = 4
    if args.setting == "paper":
        synthetic.update(n_clients=args.n_clients, n_corrupted=args.n_corrupted, severity=args.severity,
                         alpha=args.alpha)
        n_clients = args.n_clients
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            prepare_run(method, seed, args.rounds, synthetic, n_clients, args.out)
    records = []
    for seed in args.seeds:
        for method in args.methods:
            record = run_one(method, seed, args.rounds, n_clients, args.threads or n_clients, args.out)
            print(f"{method} seed {seed}: {record['seconds']}s {scores(record, args.last)}", flush=True)
            records.append(record)
    command = "python benchmarks/compare_fairness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_tables(aggregate(records, args.methods, args.last), args.out, command))
    plot(records, args.methods, args.out)


if __name__ == "__main__":
    main()
