#!/usr/bin/env python3
"""The timing floor of a FLARE run: the bare loop's FedAvg with one process per site and no framework.

The FLARE simulator runs every site in its own process, so on a machine with several cores the sites train at the
same time. The sequential bare loop (:mod:`bare_loop`) trains them one after another and is no fair floor for that.
This runner does exactly the work of a default segmentation job with the sites' parallelism and nothing else: one
spawned process per site holds the site's data, model and trainer; every round the main process sends it the global
model through a pipe, the site evaluates it on its validation and test splits, trains one round and sends its
weights back; the main process averages them and takes the server's momentum step. At the end every site scores
the final and the best global model and every site's last local model on its test split, as FLARE's cross-site
evaluation does. The sites are seeded and shuffled as :func:`bare_loop.run` seeds them, so at one thread per site
the global models equal the sequential loop's.

    python benchmarks/parallel_floor.py --rounds 8 --set optimizer=sgd lr=0.03 reset_optimizer=true server_momentum=0.5

Not done here, and so counted as the job's overhead by ``benchmarks/overhead.py``: messaging and polling, the
evaluation of each site's local model after training, client state files, persistence, logs and TensorBoard.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "custom"))

from bare_loop import LoopConfig, benchmark_of, parse_value, server_step, trainer_args  # noqa: E402
from medflare.algorithms.aggregation import sample_weights, weighted_average  # noqa: E402
from medflare.segmentation.data import load_site_data  # noqa: E402
from medflare.data import resolve_site_config  # noqa: E402
from medflare.flare.executors.base import load_weights, weights_to_numpy  # noqa: E402
from medflare.segmentation.metrics import evaluate_segmentation  # noqa: E402
from medflare.networks import build_model  # noqa: E402
from medflare.segmentation.training import SegmentationTrainer, round_lr  # noqa: E402

log = logging.getLogger("parallel_floor")


def site_process(conn, cfg: LoopConfig, site: str) -> None:
    """One site: answer ``("round", r, weights)`` with (val Dice, test Dice, local weights or None after the last
    round) and ``("score", [weights...])`` with the test Dice of each model; ``None`` ends it."""
    torch.set_num_threads(cfg.threads)
    syn, spec, _ = benchmark_of(cfg)
    data = load_site_data(resolve_site_config(site, None, syn.modalities), spec, syn)
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    trainer = SegmentationTrainer(build_model("unet", spatial_dims=syn.spatial_dims), device, **trainer_args(cfg))
    model = trainer.model
    conn.send(len(data.train))

    def dice(split) -> float:
        return evaluate_segmentation(model, split, 3, device)["dice"]

    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg[0] == "score":
            scores = []
            for weights in msg[1]:
                load_weights(model, weights, "model to score")
                scores.append(dice(data.test))
            conn.send(scores)
            continue
        _, rnd, weights = msg
        load_weights(model, weights, "global")
        val, test = dice(data.val), dice(data.test)
        local = None
        if rnd < cfg.rounds:
            trainer.set_lr(round_lr(cfg.lr, cfg.lr_schedule, rnd, cfg.rounds))
            trainer.fit(data.train, cfg.local_epochs, cfg.batch_size, seed=cfg.seed * 1000 + rnd)
            local = weights_to_numpy(model)
        conn.send((val, test, local))


def run(cfg: LoopConfig) -> Dict[str, Any]:
    """Train ``cfg.rounds`` rounds of FedAvg(M) with one process per site; per-round val/test Dice and timings."""
    if cfg.method != "fedavg":
        raise ValueError("the parallel floor runs FedAvg only")
    start = time.time()
    syn, _, sites = benchmark_of(cfg)
    ctx = mp.get_context("spawn")
    pipes, procs = {}, []
    for site in sites:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=site_process, args=(child, cfg, site), daemon=True)
        proc.start()
        pipes[site], procs = parent, procs + [proc]
    try:
        n = {s: float(pipes[s].recv()) for s in sites}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            global_model = build_model("unet", spatial_dims=syn.spatial_dims)
        global_w = weights_to_numpy(global_model)
        param_names = {name for name, _ in global_model.named_parameters()}
        velocity: Optional[Dict[str, np.ndarray]] = None
        rounds: List[Dict[str, Any]] = []
        best_w, best_val = global_w, -1.0
        setup_s = time.time() - start
        for rnd in range(cfg.rounds + 1):
            if rnd < cfg.rounds:
                log.info(f"Round {rnd} started.")  # FLARE's wording, so the overhead benchmark times rounds alike
            for s in sites:
                pipes[s].send(("round", rnd, global_w))
            replies = {s: pipes[s].recv() for s in sites}
            rounds.append({"round": rnd, "val": {s: r[0] for s, r in replies.items()},
                           "test": {s: r[1] for s, r in replies.items()}})
            mean_val = float(np.mean(list(rounds[-1]["val"].values())))
            if rnd > 0 and mean_val > best_val:
                best_w, best_val = global_w, mean_val
            if rnd == cfg.rounds:
                break
            local = {s: r[2] for s, r in replies.items()}
            global_w, velocity = server_step(cfg, global_w, weighted_average(local, sample_weights(n)), velocity,
                                             param_names)
        train_s = time.time() - start - setup_s
        models = [global_w, best_w, *local.values()] if cfg.rounds else [global_w]
        for s in sites:
            pipes[s].send(("score", models))
        cross_site = {s: pipes[s].recv() for s in sites}
        for s in sites:
            pipes[s].send(None)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    mean_test = [float(np.mean(list(r["test"].values()))) for r in rounds]
    return {"config": cfg.__dict__, "sites": sites, "rounds": rounds, "mean_test": mean_test,
            "cross_site": cross_site, "seconds": {"setup": setup_s, "rounds": train_s,
                                                  "total": time.time() - start}}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="key=value settings of bare_loop.LoopConfig")
    args = ap.parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(message)s", level=logging.INFO)
    settings = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    result = run(LoopConfig(rounds=args.rounds, seed=args.seed, **settings))
    sec = result["seconds"]
    print(f"final mean test Dice {result['mean_test'][-1]:.3f}; setup {sec['setup']:.1f} s, rounds "
          f"{sec['rounds']:.1f} s, total {sec['total']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
