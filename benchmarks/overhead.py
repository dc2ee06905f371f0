#!/usr/bin/env python3
"""What FLARE and the bundle cost on top of training: fixed cost, cost per round and memory, against the floor.

Each runner does the same work at two round counts (``--rounds 2 8`` by default), and the runs are interleaved
(runner A at R1, B at R1, ..., A at R2, B at R2, ...; repeated ``--repeats`` times) so a machine that slows down
mid-way slows every runner alike. A straight line through (R, wall time) gives each runner's fixed cost (start,
data, cross-site evaluation, stop) and its cost per round; their excess over the floor is what the
orchestration adds. Peak memory is the largest sum of proportional set sizes (PSS) over the runner's process tree,
sampled every ``--sample`` seconds; the PSS at the start of every round (read against the server log's round
starts) gives the growth per round of long runs (``--rounds 2 50``).

Runners:

* ``floor``: :mod:`parallel_floor`, the segmentation jobs' work and training settings with one process per site
  and no framework (the sites train at the same time, as in the simulator): the floor the jobs are measured
  against.
* ``bare``: :mod:`bare_loop`, the same work in one process, the sites one after another (``bare:threads=2``
  gives it two threads).
* ``stock``: stock FLARE 2.9 on the same work: its ``FedAvgRecipe`` (FedAvg controller, Client API executor,
  default settings) with :mod:`stock_flare.client`, a training script doing a medflare segmentation site's work.
* any job folder under ``jobs/`` (``fedavg``, ``fedda``, ``fedavg_cls``, ``fedism`` ...), run with
  ``nvflare simulator -n N -t N`` on its built-in benchmark (3 sites for segmentation, 4 for the fairness jobs).
* ``JOB:key=value,ctl.key=value``: a job with other executor or (``ctl.``) controller arguments, e.g.
  ``fedavg:evaluate_local_model=false`` or ``fedavg:ctl.memory_gc_rounds=1``.
* ``JOB@N/T``: a fairness job with N sites (the paper setting of the classification benchmark: N clients, N/5 of
  them corrupted) on T simulator workers; with T < N FLARE runs the sites' tasks in turn on T worker processes,
  each site's state kept in its app folder between turns. This is how 20 to 100 sites fit on one small machine.
  Cross-site evaluation then scores the global model only (the local models would make it N x N tasks).

    python benchmarks/overhead.py --repeats 3                      # floor, fedavg, fedda, fedavg_cls, fedism
    python benchmarks/overhead.py --runners floor fedavg fedavg:evaluate_local_model=false --rounds 2 8
    python benchmarks/overhead.py --runners fedavg --rounds 2 50      # memory growth per round
    python benchmarks/overhead.py --runners fedavg_cls@20/2 fedavg_cls@50/2 fedavg_cls@100/2 --rounds 1 2

Prints a Markdown table (and writes it to ``--out`` with the raw timings as JSON). Do not run anything else on the
machine meanwhile: the figures are wall times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import datetime
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from compare import parse_method  # noqa: E402
from jobtools import NVFLARE  # noqa: E402
from jobspec import get_job, merge_args, write_job  # noqa: E402

#: Training settings of the segmentation jobs, given to the bare loop so it does the same work.
BARE_LOOP_SETTINGS = ["optimizer=sgd", "lr=0.03", "reset_optimizer=true", "server_momentum=0.5"]
#: Sites of each job's built-in benchmark.
FAIRNESS_SITES = 4
SEGMENTATION_SITES = 3


@dataclass
class Measurement:
    """One run: its wall time, the peak PSS of its process tree and that PSS at the start of every round."""

    runner: str
    rounds: int
    seconds: float
    peak_pss_mb: float
    round_pss_mb: List[float] = field(default_factory=list)
    repeat: int = 0
    round_seconds: List[float] = field(default_factory=list)


ROUND_START = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - INFO - Round (\d+) started")


def round_start_times(log: str) -> List[float]:
    """Epoch seconds at which the server log in ``log`` says each training round started (local-time stamps)."""
    times = []
    with open(log, errors="replace") as f:
        for line in f:
            m = ROUND_START.match(line)
            if m:
                times.append(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
    return times


def pss_at(samples: Sequence[tuple], times: Sequence[float]) -> List[float]:
    """The first PSS sample taken at or after each of ``times`` (``samples``: (epoch s, MiB), in time order);
    times after the last sample are left out."""
    out, i = [], 0
    for t in times:
        while i < len(samples) and samples[i][0] < t:
            i += 1
        if i == len(samples):
            break
        out.append(samples[i][1])
    return out


def growth_per_round(round_pss: Sequence[float], skip: float = 0.5) -> Optional[float]:
    """Slope (MiB per round) of a line through the PSS at each round's start, leaving out the first ``skip``
    fraction of the rounds (start-up: imports, data, and the allocators' warm-up, which at the sites lasts about 20
    rounds of the built-in benchmark); ``None`` with fewer than 5 rounds left."""
    points = list(round_pss)[max(2, int(len(round_pss) * skip)):]
    if len(points) < 5:
        return None
    return float(np.polyfit(np.arange(len(points), dtype=float), np.array(points), 1)[0])


def tree_pss_mb(root: psutil.Process) -> float:
    """Sum of the proportional set sizes of ``root`` and its descendants, in MiB (vanished processes count 0)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return total / 2**20


def run_measured(cmd: Sequence[str], log: str, sample_s: float, env: Optional[Dict[str, str]] = None) -> tuple:
    """Run ``cmd`` to completion; return (wall seconds, peak tree PSS in MiB, [(epoch s, tree PSS MiB)...]).
    Raises if it fails."""
    samples: List[tuple] = []
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        root = psutil.Process(proc.pid)

        def sample() -> None:
            while proc.poll() is None:
                try:
                    samples.append((time.time(), tree_pss_mb(root)))
                except psutil.NoSuchProcess:
                    return
                time.sleep(sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = proc.wait()
        seconds = time.perf_counter() - start
        sampler.join(timeout=5)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {code}); see {log}")
    return seconds, max((pss for _, pss in samples), default=0.0), samples


def parse_runner(runner: str) -> tuple:
    """``"fedavg_cls@20/2"`` -> (job, sites, workers, executor args, controller args); a plain job name gets its
    benchmark's sites, one worker each. A variant ``JOB:key=value,ctl.key=value`` changes executor arguments and
    (``ctl.``) controller arguments, e.g. ``fedavg:evaluate_local_model=false,ctl.memory_gc_rounds=1``."""
    head, _, scale = runner.partition("@")
    name, overrides = parse_method(head)
    executor = {k: v for k, v in overrides.items() if not k.startswith("ctl.")}
    controller = {k[4:]: v for k, v in overrides.items() if k.startswith("ctl.")}
    default_sites = FAIRNESS_SITES if name.endswith("_cls") or name.startswith("fedism") else SEGMENTATION_SITES
    if not scale:
        return name, default_sites, default_sites, executor, controller
    sites, _, workers = scale.partition("/")
    return name, int(sites), int(workers or sites), executor, controller


def stock_job(rounds: int, workdir: str) -> str:
    """Export stock FLARE's ``FedAvgRecipe`` with :mod:`stock_flare.client` (the segmentation benchmark's work
    through FLARE's Client API) into ``workdir``; returns the job folder."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe

    recipe = FedAvgRecipe(name="stock_fedavg", min_clients=SEGMENTATION_SITES, num_rounds=rounds,
                          model={"class_path": "medflare.segmentation.networks.FeatureUNet", "args": {"spatial_dims": 2}},
                          train_script=os.path.join(ROOT, "benchmarks", "stock_flare", "client.py"),
                          train_args="--seed 0", key_metric="dice")
    recipe.export(os.path.join(workdir, "job"))
    return os.path.join(workdir, "job", "stock_fedavg")


FLOOR_BENCHMARK = {"variant": "blobs", "n_train": 160, "n_val": 40, "n_test": 100}
"""The segmentation work every runner does (the benchmark the figures in docs/performance.md were measured on)."""


def runner_command(runner: str, rounds: int, workdir: str) -> tuple:
    """The command (and environment) that makes ``runner`` do ``rounds`` rounds of the shared work."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if runner.startswith(("bare", "floor")):  # e.g. "bare", "bare:threads=2", "floor"
        name, settings = parse_method(runner)
        script, seeds = ("bare_loop.py", ["--seeds", "0"]) if name == "bare" else ("parallel_floor.py", [])
        return [sys.executable, os.path.join(ROOT, "benchmarks", script), "--rounds", str(rounds), *seeds,
                "--set", *BARE_LOOP_SETTINGS, *[f"{k}={v}" for k, v in settings.items()]], env
    if runner == "stock":  # stock FLARE on the same work; the script imports medflare's data and network
        env["PYTHONPATH"] = os.path.join(ROOT, "custom")
        return [NVFLARE, "simulator", stock_job(rounds, workdir), "-w", os.path.join(workdir, "ws"),
                "-n", str(SEGMENTATION_SITES), "-t", str(SEGMENTATION_SITES)], env
    name, n_sites, workers, executor_args, controller_args = parse_runner(runner)
    executor_args = {"seed": 0, **executor_args}
    if get_job(name).key_metric == "dice":  # the floor's and stock runner's work: the blobs benchmark
        executor_args = merge_args({"synthetic": FLOOR_BENCHMARK}, executor_args)
    changes: Dict[str, object] = {}
    if "@" in runner:  # many sites: cross-site evaluation of the global model only (N x N local models is N^2 tasks)
        executor_args["synthetic"] = {"n_clients": n_sites, "n_corrupted": n_sites // 5}
        changes = {"n_sites": n_sites, "cross_site_local_models": False}
    spec = get_job(name).with_changes(executor_args=executor_args, controller_args=controller_args,
                                      num_rounds=rounds, **changes)
    job = write_job(spec, os.path.join(workdir, "job"))
    ws = os.path.join(workdir, "ws")
    return [NVFLARE, "simulator", job, "-w", ws, "-n", str(n_sites), "-t", str(workers)], env


def measure(runners: Sequence[str], rounds: Sequence[int], repeats: int, sample_s: float,
            scratch: str) -> List[Measurement]:
    """Run every runner at every round count, interleaved, ``repeats`` times."""
    results = []
    for rep in range(repeats):
        for r in rounds:
            for runner in runners:
                workdir = tempfile.mkdtemp(prefix=f"R{r}_", dir=scratch)
                cmd, env = runner_command(runner, r, workdir)
                log = os.path.join(workdir, "run.log")
                seconds, pss, samples = run_measured(cmd, log, sample_s, env)
                starts = round_start_times(log)
                results.append(Measurement(runner, r, seconds, pss, pss_at(samples, starts), rep,
                                           list(np.diff(starts)) if len(starts) > 1 else []))
                growth = growth_per_round(results[-1].round_pss_mb)
                print(f"[{rep + 1}/{repeats}] {runner:12s} R={r:3d}: {seconds:7.1f} s, peak PSS {pss:7.0f} MiB"
                      + (f", PSS growth {growth:+.2f} MiB per round" if growth is not None else ""), flush=True)
    return results


def line_fit(points: Sequence[Measurement]) -> tuple:
    """Least-squares (fixed cost, cost per round) through the (rounds, seconds) points (NaN for one round count)."""
    r = np.array([p.rounds for p in points], dtype=float)
    t = np.array([p.seconds for p in points], dtype=float)
    if len(set(r)) < 2:
        return float("nan"), float("nan")
    per_round, fixed = np.polyfit(r, t, 1)
    return float(fixed), float(per_round)


def per_round_spread(points: Sequence[Measurement]) -> Optional[tuple]:
    """(smallest, largest) cost per round over the repeats, each from that repeat's own runs; ``None`` with fewer
    than two repeats."""
    by_repeat = {}
    for p in points:
        by_repeat.setdefault(p.repeat, []).append(p)
    slopes = [line_fit(runs)[1] for runs in by_repeat.values()]
    slopes = [x for x in slopes if np.isfinite(x)]
    return (min(slopes), max(slopes)) if len(slopes) > 1 else None


def median_round(points: Sequence[Measurement]) -> float:
    """Median time from one round's start to the next over ``points``' runs, leaving out each run's first round
    (which includes the sites' start); robust to a run slowed for a while by something else. NaN without rounds."""
    durations = [d for p in points for d in p.round_seconds[1:]]
    return float(np.median(durations)) if durations else float("nan")


def _num(value: float, fmt: str) -> str:
    return format(value, fmt) if np.isfinite(value) else "–"


def summarise(results: Sequence[Measurement], floor: Optional[str] = None,
              method_pairs: Sequence[tuple] = (("fedda", "fedavg"), ("fedism", "fedavg_cls"))) -> str:
    """Markdown table: per runner fixed cost, cost per round (with its range over repeats), excess over ``floor``
    (default: ``floor`` if it ran, else ``bare``), the median round (start to next start, from the logs), wall at
    the largest R (median), peak PSS and PSS growth per round (at the largest R)."""
    runners = list(dict.fromkeys(m.runner for m in results))
    floor = floor or ("floor" if "floor" in runners else "bare")
    fits = {name: line_fit([m for m in results if m.runner == name]) for name in runners}
    top = max(m.rounds for m in results)
    lines = [f"| runner | fixed cost s | cost per round s | fixed over {floor} s | per round over {floor} s | "
             f"median round s | wall at R = {top} s | peak PSS MiB | PSS growth MiB per round |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in runners:
        fixed, per_round = fits[name]
        wall = np.median([m.seconds for m in results if m.runner == name and m.rounds == top])
        pss = max(m.peak_pss_mb for m in results if m.runner == name)
        growths = [g for m in results if m.runner == name and m.rounds == top
                   for g in [growth_per_round(m.round_pss_mb)] if g is not None]
        growth = f"{np.median(growths):+.2f}" if growths else "–"
        if floor in fits and name != floor:
            over = f"{_num(fixed - fits[floor][0], '+.1f')} | {_num(per_round - fits[floor][1], '+.2f')}"
        else:
            over = "– | –"
        spread = per_round_spread([m for m in results if m.runner == name])
        cost = _num(per_round, ".2f") + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")
        rnd = _num(median_round([m for m in results if m.runner == name]), ".2f")
        lines.append(f"| {name} | {_num(fixed, '.1f')} | {cost} | {over} | {rnd} | {wall:.1f} | {pss:.0f} | {growth} |")
    ratios = [f"{a} / {b} per round: {fits[a][1] / fits[b][1]:.2f}x"
              for a, b in method_pairs if a in fits and b in fits and fits[b][1] > 0 and np.isfinite(fits[a][1])]
    return "\n".join(lines + ([""] + ["Method cost: " + "; ".join(ratios)] if ratios else []))


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runners", nargs="+", default=["floor", "fedavg", "fedda", "fedavg_cls", "fedism"])
    ap.add_argument("--rounds", type=int, nargs="+", default=[2, 8],
                    help="round counts (two for the fixed cost and cost per round; one gives wall time and memory)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between memory samples")
    ap.add_argument("--out", help="write the table (.md) and the raw timings (.json) next to this path")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="medflare_overhead_") as scratch:
        start = time.time()
        results = measure(args.runners, args.rounds, args.repeats, args.sample, scratch)
    table = summarise(results) + f"\n\nTotal wall time of the benchmark: {time.time() - start:.0f} s"
    print(table)
    if args.out:
        base = os.path.splitext(args.out)[0]
        os.makedirs(os.path.dirname(os.path.abspath(base)) or ".", exist_ok=True)
        with open(base + ".md", "w") as f:
            f.write(table + "\n")
        with open(base + ".json", "w") as f:
            json.dump([m.__dict__ for m in results], f, indent=1)


if __name__ == "__main__":
    main()
