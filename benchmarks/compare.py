#!/usr/bin/env python3
"""Compare segmentation methods on the synthetic multi-modality benchmark, over several seeds.

Federated methods are the bundle's job folders, run in the FLARE simulator; the two reference points are trained
here with the same model, data and training code and an equal budget (``rounds`` epochs): ``local`` (each site
alone) and ``pooled`` (all sites' data in one place, the upper bound). Finished runs are skipped, so an interrupted
sweep resumes where it stopped.

    python benchmarks/compare.py --out results/fedda --seeds 0 1 2
    python benchmarks/compare.py --out /tmp/tiny --methods local fedavg --seeds 0 --rounds 2 --n-train 16

Every reported number is on the sites' test splits; validation only picks the best model (see :func:`scores`).
Writes ``<out>/results.md`` and ``<out>/results.csv`` (mean +- std over seeds, paired difference to FedAvg per
seed with its 95% interval, * where it excludes 0), ``<out>/curves.png`` (test Dice per round with a band over
seeds), ``<out>/cross_site.png`` (cross-site test Dice heatmaps), ``<out>/domain_acc.png`` (FedDA's domain head),
plus every run under ``<out>/runs/<method>/seed<k>/``. Benchmark variants: ``--variant ellipses``,
``--spatial-dims 3 --size 32``.
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


def load_benchmark(synthetic: Dict[str, Any]):
    """The benchmark's sites, their data (train/val/test) and the image settings."""
    from medflare.data import ImageSpec, resolve_site_config
    from medflare.segmentation.synthetic import SyntheticSegConfig
    from medflare.segmentation.data import load_site_data

    syn = SyntheticSegConfig(**synthetic)
    spec = ImageSpec(num_classes=syn.num_classes, spatial_dims=syn.spatial_dims,
                     spatial_size=(syn.size,) * syn.spatial_dims)
    sites = [f"site-{k + 1}" for k in range(len(syn.modalities))]
    return sites, {s: load_site_data(resolve_site_config(s, None, syn.modalities), spec, syn) for s in sites}


def probe_accuracy(model, data: Dict[str, Any], seed: int) -> float:
    """Linear-probe accuracy of telling the sites apart from ``model``'s features of their test images."""
    import torch

    from probe import linear_probe_accuracy, site_feature_set

    return linear_probe_accuracy(*site_feature_set(model, {s: d.test for s, d in data.items()},
                                                   torch.device("cpu")), seed=seed)


def run_reference(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], run_dir: str,
                  batch_size: int = 16) -> Dict[str, Any]:
    """Train ``local`` (one model per site) or ``pooled`` (one model on all sites' data) without FLARE.

    Returns a record shaped like a federated run's: per-round per-site validation and test Dice, a cross-site
    matrix on test data, and the held-out summary (final, best-on-validation, last five epochs).
    """
    import torch
    from torch.utils.data import ConcatDataset

    from medflare.segmentation.synthetic import SyntheticSegConfig
    from medflare.flare.executors.base import configure_torch
    from medflare.segmentation.metrics import evaluate_segmentation
    from medflare.networks import build_model
    from medflare.segmentation.training import DEFAULT_LR, DEFAULT_OPTIMIZER, SegmentationTrainer

    configure_torch(1, seed)
    sites, data = load_benchmark(synthetic)
    device = torch.device("cpu")
    dims = data[sites[0]].train[0]["image"].ndim - 1
    classes = SyntheticSegConfig(**synthetic).num_classes

    def new_trainer():
        torch.manual_seed(seed)
        return SegmentationTrainer(build_model("unet", spatial_dims=dims, out_channels=classes), device,
                                   lr=DEFAULT_LR, optimizer=DEFAULT_OPTIMIZER)

    def dice(model, site, split="test"):
        return evaluate_segmentation(model, getattr(data[site], split), classes, device)["dice"]

    rounds_out: List[Dict[str, Any]] = []
    if method == "local":
        trainers = {s: new_trainer() for s in sites}
        for r in range(rounds):
            for s in sites:
                trainers[s].fit(data[s].train, 1, batch_size, seed=seed * 1000 + r)
            rounds_out.append({"round": r, "val": {s: dice(trainers[s].model, s, "val") for s in sites},
                               "test": {s: dice(trainers[s].model, s) for s in sites}})
        matrix = {owner: {s: dice(trainers[owner].model, s) for s in sites} for owner in sites}
        probe = None
    elif method == "pooled":
        trainer = new_trainer()
        pooled = ConcatDataset([data[s].train for s in sites])
        for r in range(rounds):
            trainer.fit(pooled, 1, batch_size, seed=seed * 1000 + r)
            rounds_out.append({"round": r, "val": {s: dice(trainer.model, s, "val") for s in sites},
                               "test": {s: dice(trainer.model, s) for s in sites}})
        matrix = {"pooled": {s: dice(trainer.model, s) for s in sites}}
        probe = probe_accuracy(trainer.model, data, seed)
    else:
        raise ValueError(f"unknown reference method {method!r}")
    modalities = {s: data[s].modality for s in sites}
    return {"method": method, "seed": seed, "sites": sites, "modalities": modalities, "rounds": rounds_out,
            "matrix": matrix, "probe_accuracy": probe}


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
    dims = synthetic.get("spatial_dims", 2)
    image_args = {"spatial_dims": dims, "spatial_size": [synthetic.get("size", 64)] * dims} if dims != 2 else {}
    job = copy_job(name, os.path.join(run_dir, "job"), num_rounds=rounds,
                   client_args={**overrides, **image_args, "synthetic": synthetic}, seed=seed, n_sites=n_sites)
    ws = os.path.join(run_dir, "ws")
    proc = run_simulator(job, ws, n_clients=n_sites)
    run = os.path.join(ws, "server", "simulate_job")
    summary_path = os.path.join(run, "metrics", "metrics_summary.json")
    if proc.returncode != 0 or not os.path.isfile(summary_path):
        raise RuntimeError(f"{method} seed {seed} failed (exit {proc.returncode}); see {ws}.out")
    with open(summary_path) as f:
        summary = json.load(f)
    cross = summary.get("cross_site") or {}
    if "global" not in cross.get("matrix", {}):
        raise RuntimeError(f"{method} seed {seed}: no cross-site evaluation of the global model; see {ws}.out")
    return federated_record(method, seed, summary, os.path.join(run, "app_server", "FL_global_model.pt"), synthetic)


def federated_record(method: str, seed: int, summary: Dict[str, Any], checkpoint: str,
                     synthetic: Dict[str, Any]) -> Dict[str, Any]:
    """A comparison record from a FLARE run's summary, plus the linear probe of its final global model."""
    from medflare.artefacts.trained_model import load_checkpoint

    sites = sorted(summary["rounds"][-1]["sites"])
    test_rounds = {c["round"]: c["sites"] for c in summary["test"]["rounds"]}
    rounds = []
    for r in summary["rounds"]:
        entry = {"round": r["round"], "val": {s: m["dice"] for s, m in r["sites"].items()},
                 "test": test_rounds.get(r["round"], {})}
        if any("domain_acc" in m for m in r["sites"].values()):
            entry["domain_acc"] = {s: m["domain_acc"] for s, m in r["sites"].items() if "domain_acc" in m}
        rounds.append(entry)
    site_data = load_benchmark(synthetic)[1]
    model = load_checkpoint(checkpoint).network  # the network the checkpoint records (affine norms, domain head...)
    return {"method": method, "seed": seed, "sites": sites,
            "modalities": {s: summary["rounds"][-1]["sites"][s].get("modality", s) for s in sites},
            "rounds": rounds, "matrix": summary["cross_site"]["matrix"], "held_out": summary["test"],
            "probe_accuracy": probe_accuracy(model, site_data, seed)}


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


def _mean_worst(per_site: Dict[str, float]) -> tuple:
    from medflare.common.results import mean_and_worst

    both = mean_and_worst(per_site)
    return both["mean"], both["worst"]


def scores(record: Dict[str, Any]) -> Dict[str, float]:
    """Numbers of one run, all on the sites' **test** splits (validation only chooses the best model).

    - ``mean`` / ``worst``: mean and minimum over sites of the Dice of the model each method deploys there: the final
      global model (federated), the pooled model, or the site's own model (``local``); ``dice_<modality>`` per site.
    - ``best_mean`` / ``best_worst``: the model of the round with the best mean *validation* Dice, scored on test.
    - ``last5_mean`` / ``last5_worst``: mean over the final five models (how much the final figure depends on where
      training stopped); ``swing``: largest change of the mean test Dice between consecutive rounds among them.
    - ``in_site`` / ``cross_site``: local models on their own / the other sites' test data.
    - ``probe``: accuracy of a linear probe telling the sites apart from the final model's encoder features
      (chance: 1 / sites).
    """
    from medflare.common.summaries import round_stability

    matrix, sites = record["matrix"], record["sites"]
    out: Dict[str, float] = {}
    own = [m for m in sites if m in matrix]
    if own:
        out["in_site"] = float(np.mean([matrix[m][m] for m in own]))
        out["cross_site"] = float(np.mean([matrix[m][s] for m in own for s in sites if s != m]))
    deployed = matrix.get("global") or matrix.get("pooled") or {s: matrix[s][s] for s in sites}
    per_mod = {record["modalities"].get(s, s): deployed[s] for s in sites}
    out.update({f"dice_{m}": float(v) for m, v in per_mod.items()})
    out["mean"], out["worst"] = _mean_worst(deployed)
    curve = [r["test"] for r in record["rounds"] if r.get("test")]
    if "global" in matrix:  # federated: the rounds hold received models; the final one is the cross-site row
        curve = curve + [matrix["global"]]
        if matrix.get("best_global"):  # FLARE keeps no best model of a one-round run
            out["best_mean"], out["best_worst"] = _mean_worst(matrix["best_global"])
    elif record["method"] == "pooled":
        best = max(record["rounds"], key=lambda r: np.mean(list(r["val"].values())))
        out["best_mean"], out["best_worst"] = _mean_worst(best["test"])
    if record["method"] != "local" and curve:
        tail = curve[-5:]
        out["last5_mean"] = float(np.mean([_mean_worst(c)[0] for c in tail]))
        out["last5_worst"] = float(np.mean([_mean_worst(c)[1] for c in tail]))
        out["swing"] = round_stability([_mean_worst(c)[0] for c in curve])["last5_max_change"]
    if record.get("probe_accuracy") is not None:
        out["probe"] = float(record["probe_accuracy"])
    return out


def aggregate(records: Sequence[Dict[str, Any]], methods: Sequence[str],
              baseline: str = "fedavg") -> List[Dict[str, Any]]:
    """One row per method: mean and std over seeds of every score, wall time, and for ``mean`` and ``worst`` the
    paired difference to ``baseline`` over the seeds both ran (95% t interval)."""
    from paired_stats import paired_difference

    base = {r["seed"]: scores(r) for r in records if r["method"] == baseline}
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
        if method != baseline and base:
            for key in ("mean", "worst"):
                pairs = [(scores(r)[key], base[r["seed"]][key]) for r in runs if r["seed"] in base]
                if pairs:
                    row[f"vs_{baseline}_{key}"] = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
        rows.append(row)
    return rows


COLUMNS = ["mean", "worst", "best_mean", "best_worst", "last5_mean", "last5_worst", "swing", "probe", "in_site",
           "cross_site"]


def format_difference(d: Optional[Dict[str, float]]) -> str:
    if not d:
        return "–"
    if d["n"] < 2:
        return f"{d['diff']:+.3f}"
    star = " *" if d["significant"] else ""
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]{star}"


def write_tables(rows: List[Dict[str, Any]], out: str, baseline: str = "fedavg") -> str:
    """``results.md`` (the main table, then per-modality Dice) and ``results.csv``; returns the Markdown."""
    keys = []
    for row in rows:
        keys += [k for k, v in row.items() if isinstance(v, tuple) and k not in keys]
    order = [k for k in COLUMNS if k in keys]
    per_mod = sorted(k for k in keys if k.startswith("dice_"))
    base_time = next((r["wall_seconds"] for r in rows if r["method"] == baseline), None)
    header = ["method", "seeds"] + order + [f"mean − {baseline} (95% CI)", f"worst − {baseline} (95% CI)",
                                             "wall s", f"time vs {baseline}"]
    md = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    csv_lines = [",".join(["method", "seeds"] + [f"{k}_mean,{k}_std" for k in order + per_mod]
                          + [f"vs_{baseline}_{k}_{p}" for k in ("mean", "worst") for p in ("diff", "low", "high")]
                          + ["wall_seconds"])]
    for row in rows:
        cells = [row["method"], str(row["seeds"])]
        csv_cells = [row["method"], str(row["seeds"])]
        for k in order + per_mod:
            if k in row:
                if k in order:
                    cells.append(f"{row[k][0]:.3f} ± {row[k][1]:.3f}")
                csv_cells += [f"{row[k][0]:.4f}", f"{row[k][1]:.4f}"]
            else:
                if k in order:
                    cells.append("–")
                csv_cells += ["", ""]
        for k in ("mean", "worst"):
            d = row.get(f"vs_{baseline}_{k}")
            cells.append(format_difference(d))
            csv_cells += [f"{d[p]:.4f}" for p in ("diff", "low", "high")] if d else ["", "", ""]
        rel = f"{row['wall_seconds'] / base_time:.2f}x" if base_time and row["method"] not in REFERENCE_METHODS \
            else "–"
        cells += [f"{row['wall_seconds']:.0f}", rel]
        csv_cells.append(f"{row['wall_seconds']:.1f}")
        md.append("| " + " | ".join(cells) + " |")
        csv_lines.append(",".join(csv_cells))
    mod_header = ["method"] + [k.replace("dice_", "") for k in per_mod]
    md += ["", "Per-modality test Dice of the deployed model (mean ± std over seeds):", "",
           "| " + " | ".join(mod_header) + " |", "|---" * len(mod_header) + "|"]
    for row in rows:
        md.append("| " + " | ".join([row["method"]] + [f"{row[k][0]:.3f} ± {row[k][1]:.3f}" if k in row else "–"
                                                       for k in per_mod]) + " |")
    table = "\n".join(md)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write("\n".join(csv_lines) + "\n")
    return table


def plot(records: Sequence[Dict[str, Any]], methods: Sequence[str], out: str) -> List[str]:
    """``curves.png`` (mean and worst-site test Dice per round, mean over seeds with a min-max band),
    ``cross_site.png`` (test Dice heatmaps) and, for runs that report it, ``domain_acc.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if any(r["method"] == m for r in records)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for method in methods:
        runs = [r for r in records if r["method"] == method]
        for ax, reduce in zip(axes, (np.mean, np.min)):
            curves = np.array([[reduce(list(rd["test"].values())) for rd in r["rounds"]] for r in runs])
            x = np.arange(curves.shape[1])
            line, = ax.plot(x, curves.mean(axis=0), label=method)
            ax.fill_between(x, curves.min(axis=0), curves.max(axis=0), alpha=0.15, color=line.get_color())
    for ax, title in zip(axes, ("mean over sites", "worst site")):
        ax.set_title(f"Test Dice per round: {title}", fontsize=9)
        ax.set_xlabel("round (global model received)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test Dice (mean over seeds; band: min-max)")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    curves_path = os.path.join(out, "curves.png")
    fig.savefig(curves_path, dpi=110)
    plt.close(fig)
    paths = [curves_path]

    fig, axes = plt.subplots(1, len(methods), figsize=(3.4 * len(methods), 3.4), squeeze=False)
    for ax, method in zip(axes[0], methods):
        runs = [r for r in records if r["method"] == method]
        sites = runs[0]["sites"]
        models = [m for m in ("global", "best_global", "pooled") if m in runs[0]["matrix"]] + \
            [s for s in sites if s in runs[0]["matrix"]]
        grid = np.mean([[[r["matrix"][m][s] for s in sites] for m in models] for r in runs], axis=0)
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(models)):
            for j in range(len(sites)):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < 0.5 else "black")
        ax.set_xticks(range(len(sites)), [f"{s}\n{runs[0]['modalities'].get(s, '')}" for s in sites], fontsize=7)
        ax.set_yticks(range(len(models)), models, fontsize=7)
        ax.set_title(method, fontsize=9)
    fig.suptitle("Cross-site Dice (rows: models, columns: test data of each site; mean over seeds)", fontsize=9)
    fig.tight_layout()
    heat = os.path.join(out, "cross_site.png")
    fig.savefig(heat, dpi=110)
    plt.close(fig)
    paths.append(heat)

    with_domain = [m for m in methods if any("domain_acc" in rd for r in records if r["method"] == m
                                             for rd in r["rounds"])]
    if with_domain:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        for method in with_domain:
            runs = [r for r in records if r["method"] == method]
            acc = np.array([[np.mean(list(rd.get("domain_acc", {}).values()) or [np.nan]) for rd in r["rounds"]]
                            for r in runs])
            ax.plot(np.arange(acc.shape[1]), np.nanmean(acc, axis=0), label=method)
        n_sites = len(records[0]["sites"])
        ax.axhline(1 / n_sites, color="grey", ls="--", lw=1, label="chance")
        ax.set_xlabel("round")
        ax.set_ylabel("domain head accuracy on own site")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, "domain_acc.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


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
    started = time.time()
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
            log(f"[{k}/{total}] {method} seed {seed}: {status}; test Dice mean {s['mean']:.3f}, "
                f"worst {s['worst']:.3f}")
            records.append(record)
    rows = aggregate(records, methods)
    log("\n" + write_tables(rows, out))
    ran = sum(r.get("wall_seconds", 0.0) for r in records if not r.get("skipped"))
    log(f"\nsweep wall time {time.time() - started:.0f}s ({ran:.0f}s in runs started now; "
        f"{sum(r.get('wall_seconds', 0.0) for r in records):.0f}s summed over all {len(records)} runs)")
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
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--variant", default="blobs", help="benchmark variant: blobs (default), ellipses or anatomy")
    parser.add_argument("--spatial-dims", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image edge (64 in 2D; 32 is practical in 3D)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing; write the tables and plots of the runs that finished")
    args = parser.parse_args(argv)
    synthetic = {"modalities": list(args.modalities), "n_train": args.n_train, "n_val": args.n_val,
                 "n_test": args.n_test, "variant": args.variant, "spatial_dims": args.spatial_dims, "size": args.size}
    sweep(args.methods, args.seeds, args.rounds, synthetic, args.out, report_only=args.report_only)


if __name__ == "__main__":
    main()
