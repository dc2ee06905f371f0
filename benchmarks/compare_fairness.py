#!/usr/bin/env python3
"""Compare the fairness suite (FedISM, FedISM+ and six baselines) on the synthetic quality-shift benchmark.

Every method is its job folder (``jobs/<method>``), run in the FLARE simulator with the same data, model, seed and
schedule; only ``--rounds``, the benchmark size and the seed are changed. Finished runs are skipped, so an
interrupted sweep resumes where it stopped.

    python benchmarks/compare_fairness.py --out results/fairness --seeds 0 1 2 --rounds 12
    python benchmarks/compare_fairness.py --out /tmp/f20 --setting paper --n-clients 20 --methods fedism --seeds 0

Every score is on held-out **test** data (validation only selects the best model): balanced accuracy of the
final global model on each site's test split (mean, worst site, std, max-min gap; ``last5_*``: the same averaged
over the final five global models), and on the global clean and corrupted test sets (mean over the last ``--last``
rounds, as FFL4MIA reports). Methods are paired with ``fedavg_cls`` by seed: the table gives the mean difference
and its 95% t interval (``*`` where it excludes 0). Writes ``<out>/results.md``, ``<out>/results.csv``,
``<out>/curves.png`` and ``<out>/weights.png`` (every site's aggregation weight and sharpness per round).

Settings: ``--setting quality`` (4 sites; ``--qualities hq hq hq blur`` gives the minority-corrupted variant),
``--setting paper`` (N clients, the last k with Gaussian noise). Variants: ``fedavg_cls:optimizer=gsam`` (executor
arguments), ``fedism:agg.q=0`` (aggregator arguments), combined with commas.
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

from compare import finished_record, format_difference, parse_method  # noqa: E402
from jobtools import copy_job, run_simulator  # noqa: E402

from jobspec import FAIRNESS_SUITE  # noqa: E402

METHODS = FAIRNESS_SUITE
COLUMNS = ("bacc_mean", "bacc_worst", "bacc_std", "bacc_gap", "last5_mean", "last5_worst", "test_clean",
           "test_corrupted", "clean_corrupted_gap")
BASELINE = "fedavg_cls"


def split_overrides(overrides: Dict[str, Any]) -> tuple:
    """A method's settings as (executor arguments, aggregator arguments): ``agg.q=5`` is the aggregator's ``q``."""
    client = {k: v for k, v in overrides.items() if not k.startswith("agg.")}
    aggregator = {k[4:]: v for k, v in overrides.items() if k.startswith("agg.")}
    return client, aggregator


def run_dir_of(out: str, method: str, seed: int) -> str:
    return os.path.join(out, "runs", method.replace(":", "__").replace(",", "_"), f"seed{seed}")


def prepare_run(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], n_clients: int,
                out: str) -> Optional[str]:
    """Copy the job for one run (all copies are made before the first run, so editing the code during a sweep does
    not change it); returns None if the run already finished."""
    run_dir = run_dir_of(out, method, seed)
    if finished_record(method, seed, rounds, synthetic, out) is not None:
        return None
    name, overrides = parse_method(method)
    client, aggregator = split_overrides(overrides)
    job_root = os.path.join(run_dir, "job")
    if os.path.isdir(job_root):
        import shutil

        shutil.rmtree(job_root)
    os.makedirs(run_dir, exist_ok=True)
    return copy_job(name, job_root, num_rounds=rounds, client_args={**client, "synthetic": {**synthetic, "seed": seed}},
                    seed=seed, n_sites=n_clients, aggregator_args=aggregator)


def run_one(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], n_clients: int, threads: int,
            out: str) -> Dict[str, Any]:
    """Run one method and seed in the simulator, or load its record when a run with the same rounds and benchmark
    settings finished (a record of other settings is run again and replaced)."""
    finished = finished_record(method, seed, rounds, synthetic, out)
    if finished is not None:
        return finished
    run_dir = run_dir_of(out, method, seed)
    record_path = os.path.join(run_dir, "record.json")
    job = os.path.join(run_dir, "job", parse_method(method)[0])
    ws = os.path.join(run_dir, "ws")
    start = time.time()
    proc = run_simulator(job, ws, n_clients=n_clients, threads=threads,
                         env={"MEDFLARE_CACHE_DIR": os.path.join(out, "cache")})
    seconds = time.time() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{method} seed {seed} failed (rc {proc.returncode}); see {ws}.out")
    with open(os.path.join(ws, "server", "simulate_job", "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    record = {"method": method, "seed": seed, "rounds": rounds, "rounds_budget": rounds, "synthetic": synthetic,
              "seconds": round(seconds, 1),
              "summary_rounds": summary["rounds"], "cross_site": summary.get("cross_site"),
              "held_out": summary.get("test")}
    with open(record_path, "w") as f:
        json.dump(record, f)
    return record


def scores(record: Dict[str, Any], last: int) -> Dict[str, float]:
    """Test-split fairness of the final global model, its last-five average, and the global test sets' balanced
    accuracy averaged over the last ``last`` rounds."""
    values: Dict[str, List[float]] = {c: [] for c in COLUMNS}
    held_out = record.get("held_out") or {}
    final = (held_out.get("matrix") or {}).get("global")
    if final:
        v = np.array(list(final.values()))
        values["bacc_mean"].append(float(v.mean()))
        values["bacc_worst"].append(float(v.min()))
        values["bacc_std"].append(float(v.std()))
        values["bacc_gap"].append(float(v.max() - v.min()))
    if held_out.get("last5"):
        values["last5_mean"].append(held_out["last5"]["mean"])
        values["last5_worst"].append(held_out["last5"]["worst"])
    for entry in record["summary_rounds"][-last:]:
        test = entry.get("global_test") or {}
        for src, dst in (("clean_bacc", "test_clean"), ("corrupted_bacc", "test_corrupted"),
                         ("clean_corrupted_gap", "clean_corrupted_gap")):
            if src in test:
                values[dst].append(test[src])
    return {k: float(np.mean(v)) for k, v in values.items() if v}


def aggregate(records: Sequence[Dict[str, Any]], methods: Sequence[str], last: int) -> List[Dict[str, Any]]:
    from paired_stats import paired_difference

    base = {r["seed"]: scores(r, last) for r in records if r["method"] == BASELINE}
    rows = []
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        runs = [scores(r, last) for r in mine]
        if not runs:
            continue
        row: Dict[str, Any] = {"method": method, "n_seeds": len(runs),
                               "seconds": float(np.mean([r["seconds"] for r in mine]))}
        for c in COLUMNS:
            vals = [r[c] for r in runs if c in r]
            if vals:
                row[c] = float(np.mean(vals))
                row[f"{c}_sd"] = float(np.std(vals))
        if method != BASELINE:
            for c in ("bacc_mean", "bacc_worst"):
                pairs = [(scores(r, last)[c], base[r["seed"]][c]) for r in mine
                         if r["seed"] in base and c in base[r["seed"]]]
                if pairs:
                    row[f"vs_{c}"] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        rows.append(row)
    return rows


def write_tables(rows: List[Dict[str, Any]], out: str, command: str) -> str:
    header = ["method", "seeds", *COLUMNS, f"mean − {BASELINE} (95% CI)", f"worst − {BASELINE} (95% CI)", "s/run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], str(row["n_seeds"])]
        cells += [f"{row[c]:.3f} ± {row[c + '_sd']:.3f}" if c in row else "" for c in COLUMNS]
        cells += [format_difference(row.get("vs_bacc_mean")), format_difference(row.get("vs_bacc_worst"))]
        cells.append(f"{row['seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Regenerate: `{command}`\n\n{text}\n")
    with open(os.path.join(out, "results.csv"), "w") as f:
        cols = ["method", "n_seeds", "seconds"] + [x for c in COLUMNS for x in (c, c + "_sd")]
        f.write(",".join(cols + ["vs_mean_diff", "vs_mean_low", "vs_mean_high", "vs_worst_diff", "vs_worst_low",
                                 "vs_worst_high"]) + "\n")
        for row in rows:
            diffs = [str((row.get(f"vs_{c}") or {}).get(k, "")) for c in ("bacc_mean", "bacc_worst")
                     for k in ("diff", "low", "high")]
            f.write(",".join([str(row.get(c, "")) for c in cols] + diffs) + "\n")
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
    plot_weights(records, methods, out, plt)
    return path


def plot_weights(records: Sequence[Dict[str, Any]], methods: Sequence[str], out: str, plt) -> Optional[str]:
    """Every site's aggregation weight and reported sharpness per round (first seed of each method)."""
    shown = [m for m in methods if any(r["method"] == m for r in records)]
    if not shown:
        return None
    fig, axes = plt.subplots(2, len(shown), figsize=(3.6 * len(shown), 6), squeeze=False)
    for col, method in enumerate(shown):
        run = next(r for r in records if r["method"] == method)
        sites = sorted({s for e in run["summary_rounds"] for s in e["sites"]})
        for site in sites:
            w = [(e.get("aggregation_weights") or {}).get(site, np.nan) for e in run["summary_rounds"]]
            sh = [e["sites"].get(site, {}).get("sharpness", np.nan) for e in run["summary_rounds"]]
            quality = next((e["sites"][site].get("quality") for e in run["summary_rounds"] if site in e["sites"]), "")
            axes[0][col].plot(w, label=f"{site} ({quality})")
            axes[1][col].plot(sh, label=site)
        axes[0][col].set_title(f"{method}: aggregation weight", fontsize=8)
        axes[1][col].set_title("reported sharpness", fontsize=8)
        axes[1][col].set_xlabel("round")
    axes[0][0].legend(fontsize=6)
    path = os.path.join(out, "weights.png")
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
    parser.add_argument("--qualities", nargs="+", help="site qualities of the quality setting, e.g. hq hq hq blur")
    parser.add_argument("--n-clients", type=int, default=20)
    parser.add_argument("--n-corrupted", type=int, default=4)
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=0, help="simulator threads (0: one per client)")
    args = parser.parse_args(argv)
    synthetic: Dict[str, Any] = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    n_clients = 4
    if args.qualities:
        synthetic["qualities"] = list(args.qualities)
        n_clients = len(args.qualities)
    if args.setting == "paper":
        synthetic.update(n_clients=args.n_clients, n_corrupted=args.n_corrupted, severity=args.severity,
                         alpha=args.alpha)
        n_clients = args.n_clients
    os.makedirs(args.out, exist_ok=True)
    for seed in args.seeds:
        for method in args.methods:
            prepare_run(method, seed, args.rounds, synthetic, n_clients, args.out)
    records = []
    started = time.time()
    for seed in args.seeds:
        for method in args.methods:
            record = run_one(method, seed, args.rounds, synthetic, n_clients, args.threads or n_clients, args.out)
            print(f"{method} seed {seed}: {record['seconds']}s {scores(record, args.last)}", flush=True)
            records.append(record)
    command = "python benchmarks/compare_fairness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_tables(aggregate(records, args.methods, args.last), args.out, command))
    plot(records, args.methods, args.out)
    print(f"sweep wall time {time.time() - started:.0f}s; runs {sum(r['seconds'] for r in records):.0f}s in all")


if __name__ == "__main__":
    main()
