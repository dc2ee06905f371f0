#!/usr/bin/env python3
"""Compare segmentation methods on the synthetic multi-modality benchmark, over several seeds.

Federated methods are the bundle's job folders, run in the FLARE simulator; the two reference points are trained
here with the same model, data and training code and an equal budget (``rounds`` epochs): ``local`` (each site
alone) and ``pooled`` (all sites' data in one place, the upper bound). Finished runs are skipped, so an interrupted
sweep resumes where it stopped.

    python benchmarks/compare.py --out results/fedda --seeds 0 1 2
    python benchmarks/compare.py --out /tmp/tiny --methods local fedavg --seeds 0 --rounds 2 --n-train 16

Writes ``<out>/results.md`` and ``<out>/results.csv`` (mean +- std over seeds), ``<out>/curves.png`` (per-site
validation Dice per round) and ``<out>/cross_site.png`` (cross-site Dice heatmaps), plus every run under
``<out>/runs/<method>/seed<k>/``.
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

REFERENCE_METHODS = ("local", "pooled")
DEFAULT_METHODS = ("local", "pooled", "fedavg", "fedprox", "fedda", "fedda_cyclic")
DEFAULT_MODALITIES = ("t1", "t2", "ct")


# ---------------------------------------------------------------------------------------------- one run


def run_reference(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], run_dir: str,
                  batch_size: int = 16, lr: float = 3e-3) -> Dict[str, Any]:
    """Train ``local`` (one model per site) or ``pooled`` (one model on all sites' data) without FLARE.

    Returns a record shaped like a federated run's: per-round per-site Dice and a cross-site matrix.
    """
    import torch
    from torch.utils.data import ConcatDataset

    from medflare.data import ImageSpec, SyntheticSegConfig, load_site_data, resolve_site_config
    from medflare.metrics import evaluate_segmentation
    from medflare.networks import build_model
    from medflare.training import SegmentationTrainer

    syn = SyntheticSegConfig(**synthetic)
    spec = ImageSpec()
    sites = [f"site-{k + 1}" for k in range(len(syn.modalities))]
    data = {s: load_site_data(resolve_site_config(s, None, syn.modalities), spec, syn) for s in sites}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def new_trainer():
        torch.manual_seed(seed)
        return SegmentationTrainer(build_model("unet"), device, lr=lr)

    def dice(model, site):
        return evaluate_segmentation(model, data[site].val, 3, device)["dice"]

    rounds_out: List[Dict[str, Any]] = []
    if method == "local":
        trainers = {s: new_trainer() for s in sites}
        for r in range(rounds):
            for s in sites:
                trainers[s].fit(data[s].train, 1, batch_size, seed=seed * 1000 + r)
            rounds_out.append({"round": r, "sites": {s: dice(trainers[s].model, s) for s in sites}})
        matrix = {owner: {s: dice(trainers[owner].model, s) for s in sites} for owner in sites}
    elif method == "pooled":
        trainer = new_trainer()
        pooled = ConcatDataset([data[s].train for s in sites])
        for r in range(rounds):
            trainer.fit(pooled, 1, batch_size, seed=seed * 1000 + r)
            rounds_out.append({"round": r, "sites": {s: dice(trainer.model, s) for s in sites}})
        matrix = {"pooled": {s: dice(trainer.model, s) for s in sites}}
    else:
        raise ValueError(f"unknown reference method {method!r}")
    modalities = {s: data[s].modality for s in sites}
    return {"method": method, "seed": seed, "sites": sites, "modalities": modalities, "rounds": rounds_out,
            "matrix": matrix}


def parse_method(method: str) -> tuple:
    """``"fedda:adv_weight=0.1,warmup_rounds=0"`` -> ``("fedda", {"adv_weight": 0.1, "warmup_rounds": 0})``:
    a job name plus executor arguments that override the job's (values are JSON)."""
    name, _, spec = method.partition(":")
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"bad method variant {method!r}: expected key=value after ':'")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def run_federated(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], run_dir: str) -> Dict[str, Any]:
    """Run ``jobs/<method>`` (or a variant, see :func:`parse_method`) in the simulator; return its record."""
    import shutil

    name, overrides = parse_method(method)
    n_sites = len(synthetic.get("modalities", DEFAULT_MODALITIES))
    for stale in ("job", "ws"):
        shutil.rmtree(os.path.join(run_dir, stale), ignore_errors=True)
    job = copy_job(name, os.path.join(run_dir, "job"), num_rounds=rounds,
                   client_args={**overrides, "seed": seed, "synthetic": synthetic},
                   server_args={"min_clients": n_sites}, component_args={"persistor": {"seed": seed}})
    ws = os.path.join(run_dir, "ws")
    proc = run_simulator(job, ws, n_clients=n_sites)
    summary_path = os.path.join(ws, "server", "simulate_job", "metrics", "metrics_summary.json")
    if proc.returncode != 0 or not os.path.isfile(summary_path):
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); see {ws}.out")
    with open(summary_path) as f:
        summary = json.load(f)
    cross = summary.get("cross_site") or {}
    if "global" not in cross.get("matrix", {}):
        raise RuntimeError(f"{method} seed {seed}: no cross-site evaluation of the global model; see {ws}.out")
    sites = sorted(summary["rounds"][-1]["sites"])
    return {"method": method, "seed": seed, "sites": sites,
            "modalities": {s: summary["rounds"][-1]["sites"][s].get("modality", s) for s in sites},
            "rounds": [{"round": r["round"], "sites": {s: m["dice"] for s, m in r["sites"].items()}}
                       for r in summary["rounds"]],
            "matrix": cross["matrix"]}


def run_one(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], out: str) -> Dict[str, Any]:
    """Run (or load, when already finished) one method and seed; the record is saved as ``record.json``."""
    finished = finished_record(method, seed, rounds, synthetic, out)
    if finished is not None:
        return finished
    run_dir = os.path.join(out, "runs", method.replace(":", "__").replace(",", "_"), f"seed{seed}")
    record_path = os.path.join(run_dir, "record.json")
    os.makedirs(run_dir, exist_ok=True)
    start = time.time()
    runner = run_reference if method in REFERENCE_METHODS else run_federated
    record = runner(method, seed, rounds, {**synthetic, "seed": seed}, run_dir)
    record.update(wall_seconds=round(time.time() - start, 1), rounds_budget=rounds, synthetic=synthetic)
    with open(record_path + ".tmp", "w") as f:
        json.dump(record, f, indent=1)
    os.replace(record_path + ".tmp", record_path)
    return record


# ---------------------------------------------------------------------------------------------- scoring


def scores(record: Dict[str, Any]) -> Dict[str, float]:
    """Numbers of one run.

    - ``in_site`` / ``cross_site``: Dice of each site's own model on its own / on the other sites' validation data
      (diagonal / off-diagonal of the local models' matrix; not defined for ``pooled``).
    - ``dice_<modality>``: Dice, on that modality's site, of the model each method deploys there: the final global
      model (federated), the pooled model, or the site's own model (``local``).
    - ``mean`` / ``worst``: mean and minimum of those per-modality numbers.
    - ``best_mean`` / ``best_worst``: the same for the best global model kept during training (federated only).
    """
    matrix, sites = record["matrix"], record["sites"]
    out: Dict[str, float] = {}
    own = [m for m in sites if m in matrix]
    if own:
        out["in_site"] = float(np.mean([matrix[m][m] for m in own]))
        out["cross_site"] = float(np.mean([matrix[m][s] for m in own for s in sites if s != m]))
    deployed = matrix.get("global") or matrix.get("pooled") or {s: matrix[s][s] for s in sites}
    per_mod = {record["modalities"].get(s, s): deployed[s] for s in sites}
    out.update({f"dice_{m}": float(v) for m, v in per_mod.items()})
    out["mean"] = float(np.mean(list(per_mod.values())))
    out["worst"] = float(np.min(list(per_mod.values())))
    if "best_global" in matrix:
        out["best_mean"] = float(np.mean([matrix["best_global"][s] for s in sites]))
        out["best_worst"] = float(np.min([matrix["best_global"][s] for s in sites]))
    return out


def aggregate(records: Sequence[Dict[str, Any]], methods: Sequence[str]) -> List[Dict[str, Any]]:
    """One row per method: mean and std over seeds of every score, plus wall time."""
    rows = []
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        if not runs:
            continue
        per_run = [scores(r) for r in runs]
        row: Dict[str, Any] = {"method": method, "seeds": len(runs)}
        for key in per_run[0]:
            vals = [p[key] for p in per_run if key in p]
            row[key] = (float(np.mean(vals)), float(np.std(vals)))
        row["wall_seconds"] = float(np.mean([r.get("wall_seconds", float("nan")) for r in runs]))
        rows.append(row)
    return rows


def write_tables(rows: List[Dict[str, Any]], out: str) -> str:
    keys = []
    for row in rows:
        keys += [k for k, v in row.items() if isinstance(v, tuple) and k not in keys]
    order = ["mean", "worst"] + sorted(k for k in keys if k.startswith("dice_")) + \
        ["best_mean", "best_worst", "in_site", "cross_site"]
    order = [k for k in order if k in keys]
    fedavg_time = next((r["wall_seconds"] for r in rows if r["method"] == "fedavg"), None)
    header = ["method", "seeds"] + order + ["wall s", "time vs FedAvg"]
    md = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    csv_lines = [",".join(["method", "seeds"] + [f"{k}_mean,{k}_std" for k in order] + ["wall_seconds"])]
    for row in rows:
        cells = [row["method"], str(row["seeds"])]
        csv_cells = [row["method"], str(row["seeds"])]
        for k in order:
            if k in row:
                cells.append(f"{row[k][0]:.3f} ± {row[k][1]:.3f}")
                csv_cells += [f"{row[k][0]:.4f}", f"{row[k][1]:.4f}"]
            else:
                cells.append("–")
                csv_cells += ["", ""]
        rel = f"{row['wall_seconds'] / fedavg_time:.2f}x" if fedavg_time and row["method"] not in REFERENCE_METHODS \
            else "–"
        cells += [f"{row['wall_seconds']:.0f}", rel]
        csv_cells.append(f"{row['wall_seconds']:.1f}")
        md.append("| " + " | ".join(cells) + " |")
        csv_lines.append(",".join(csv_cells))
    table = "\n".join(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write("\n".join(csv_lines) + "\n")
    return table


def plot(records: Sequence[Dict[str, Any]], methods: Sequence[str], out: str) -> List[str]:
    """``curves.png`` (per-site validation Dice per round, mean over seeds) and ``cross_site.png`` (heatmaps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if any(r["method"] == m for r in records)]
    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.2), sharey=True, squeeze=False)
    for ax, method in zip(axes[0], methods):
        runs = [r for r in records if r["method"] == method]
        for site in runs[0]["sites"]:
            curve = np.mean([[rd["sites"][site] for rd in r["rounds"]] for r in runs], axis=0)
            ax.plot(range(len(curve)), curve, label=f"{site} ({runs[0]['modalities'].get(site, '')})")
        ax.set_title(method)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation Dice")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Per-site validation Dice per round (global model for FL; mean over seeds)", fontsize=9)
    fig.tight_layout()
    curves = os.path.join(out, "curves.png")
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        runs = [r for r in records if r["method"] == method]
        sites = runs[0]["sites"]
        models = [m for m in ("global", "pooled") if m in runs[0]["matrix"]] + [s for s in sites if s in runs[0]["matrix"]]
        grid = np.mean([[[r["matrix"][m][s] for s in sites] for m in models] for r in runs], axis=0)
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(models)):
            for j in range(len(sites)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(sites)), [f"{s}\n{runs[0]['modalities'].get(s, '')}" for s in sites], fontsize=7)
        ax.set_yticks(range(len(models)), models, fontsize=7)
        ax.set_title(method, fontsize=9)
    fig.suptitle("Cross-site Dice (rows: models, columns: validation data of each site; mean over seeds)", fontsize=9)
    fig.tight_layout()
    heat = os.path.join(out, "cross_site.png")
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    return [curves, heat]


# ---------------------------------------------------------------------------------------------- CLI


def finished_record(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], out: str) -> Optional[Dict]:
    """The saved record of a finished run with these settings, or ``None``."""
    path = os.path.join(out, "runs", method.replace(":", "__").replace(",", "_"), f"seed{seed}", "record.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record.get("rounds_budget") != rounds or record.get("synthetic") != synthetic:
        return None
    record["skipped"] = True
    return record


def sweep(methods: Sequence[str], seeds: Sequence[int], rounds: int, synthetic: Dict[str, Any], out: str,
          log=print, report_only: bool = False) -> List[Dict[str, Any]]:
    """Run every method x seed (skipping finished ones), then write tables and plots; returns the records.

    With ``report_only`` nothing runs: the tables and plots cover the runs that already finished.
    """
    os.makedirs(out, exist_ok=True)
    records, total, k = [], len(methods) * len(seeds), 0
    for seed in seeds:
        for method in methods:
            k += 1
            if report_only:
                record = finished_record(method, seed, rounds, synthetic, out)
                if record is not None:
                    records.append(record)
                continue
            log(f"[{k}/{total}] {method} seed {seed}: running ({rounds} rounds)...")
            record = run_one(method, seed, rounds, synthetic, out)
            s = scores(record)
            status = "already done" if record.get("skipped") else f"done in {record['wall_seconds']:.0f}s"
            log(f"[{k}/{total}] {method} seed {seed}: {status}; mean Dice {s['mean']:.3f}, worst {s['worst']:.3f}")
            records.append(record)
    rows = aggregate(records, methods)
    log("\n" + write_tables(rows, out))
    for path in plot(records, methods, out):
        log(f"wrote {path}")
    return records


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (re-use it to resume a sweep)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                        help=f"jobs under jobs/ and/or {list(REFERENCE_METHODS)}; a job variant overrides executor "
                             "arguments: fedda:adv_weight=0.1")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=20, help="FL rounds = epochs of local/pooled training")
    parser.add_argument("--modalities", nargs="+", default=list(DEFAULT_MODALITIES))
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--n-val", type=int, default=40)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; write the tables and plots of the runs that finished")
    args = parser.parse_args(argv)
    synthetic = {"modalities": list(args.modalities), "n_train": args.n_train, "n_val": args.n_val}
    sweep(args.methods, args.seeds, args.rounds, synthetic, args.out, report_only=args.report_only)


if __name__ == "__main__":
    main()
