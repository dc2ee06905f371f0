#!/usr/bin/env python3
"""Federated segmentation without FLARE: the same sites, data, model, trainer and averaging, in one process.

This is the floor the FLARE jobs are measured against (no messaging, no polling, no persistence) and the fast way
to sweep training settings: a round costs only the sites' local training and the evaluation of the global model.
Each site gets its own trainer, seeded and shuffled exactly as :class:`medflare.flare.executors.SegmentationExecutor`
does, so a run here follows the FLARE job's trajectory step for step at the same thread count.

    python benchmarks/bare_loop.py --rounds 20 --seed 0 --set optimizer=sgd lr=0.01
    python benchmarks/bare_loop.py --grid reset_optimizer=true,false --seeds 0 1 --out results/sweeps/reset.json

Every round the global model is evaluated on every site's validation split (model selection) and test split
(reporting). Prints one line per run with final and last-5 test Dice and the round-to-round change.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "custom"))

from medflare.algorithms.aggregation import sample_weights, weighted_average  # noqa: E402
from medflare.algorithms.alignment import DomainAdversarialTrainer, adversarial_weight, domain_accuracy  # noqa: E402
from medflare.data import ImageSpec, resolve_site_config  # noqa: E402
from medflare.segmentation.synthetic import SyntheticSegConfig  # noqa: E402
from medflare.segmentation.data import load_site_data  # noqa: E402
from medflare.flare.executors.base import load_weights, weights_to_numpy  # noqa: E402
from medflare.algorithms.feature_stats import StatisticsAlignmentTrainer, site_feature_statistics  # noqa: E402
from medflare.segmentation.metrics import evaluate_segmentation  # noqa: E402
from medflare.networks import build_model  # noqa: E402
from medflare.segmentation.networks import norm_layer_keys  # noqa: E402
from medflare.algorithms.personalization import (PersonalHeadTrainer, ProximalPersonalTrainer, site_private_keys)  # noqa: E402
from probe import linear_probe_accuracy, site_feature_set, site_histogram_set  # noqa: E402
from medflare.common.summaries import round_stability  # noqa: E402
from medflare.segmentation.training import SegmentationTrainer, round_lr  # noqa: E402


@dataclass
class LoopConfig:
    """Settings of one in-process federated run (the executor's training arguments plus the server rule).

    ``server_lr`` and ``server_momentum`` apply the averaged update through a server SGD step
    (FedAvgM; ``server_lr=1, server_momentum=0`` is FedAvg).
    """

    rounds: int = 20
    seed: int = 0
    lr: float = 3e-3
    optimizer: str = "adam"
    reset_optimizer: bool = False
    lr_schedule: str = "constant"
    local_epochs: int = 1
    batch_size: int = 16
    fedprox_mu: float = 0.0
    server_lr: float = 1.0
    server_momentum: float = 0.0
    synthetic: Dict[str, Any] = field(default_factory=lambda: {"modalities": ["t1", "t2", "ct"]})
    threads: int = 1
    method: str = "fedavg"  # "fedda": domain-adversarial alignment among sites; "local", "pooled": references
    model: Dict[str, Any] = field(default_factory=dict)  # network arguments, e.g. {"norm": "batch"}
    intensity_augmentation: str = "none"
    augmentation_prob: float = 0.5
    keep_local: str = "none"  # "norm": normalisation layers stay at the sites (FedBN); "norm_stats": their
    # running statistics only (SiloBN); "first_norm": only the first normalisation layer (an input adapter)
    adv_weight: float = 0.1
    head_lr: float = 0.1
    warmup_rounds: int = 2
    disc_lr: float = 1e-3
    disc_hidden: int = 64
    alignment: str = "adversarial"
    holdout: str = ""  # a site (e.g. "site-2") that does not train: leave-one-modality-out evaluation
    probe_every: int = 1  # rounds between linear site probes of the global model (0: final model only)
    # personalisation (docs/personalization.md): "ditto" trains a personal model per site; keep_local="head" keeps
    # the output head (and, with model {"name": "unet_calibrated"}, FedLC's calibration modules) at the sites
    ditto_lambda: float = 0.1
    personal_epochs: int = 1
    head_steps: int = 0  # FedLC: the first batches of each round train only the site-local layers
    inconsistency_weight: float = 0.0  # FedDP: pixel loss weights 1 + beta * u
    finetune_epochs: int = 0  # in the last round each site fine-tunes the received global model alone


def benchmark_of(cfg: LoopConfig) -> tuple:
    """The built-in benchmark ``cfg`` runs on: (synthetic settings, image spec, site names)."""
    syn = SyntheticSegConfig(**{**cfg.synthetic, "seed": cfg.synthetic.get("seed", cfg.seed)})
    spec = ImageSpec(num_classes=syn.num_classes, spatial_dims=syn.spatial_dims,
                     spatial_size=(syn.size,) * syn.spatial_dims)
    return syn, spec, [f"site-{k + 1}" for k in range(len(syn.modalities))]


def trainer_args(cfg: LoopConfig) -> Dict[str, Any]:
    """Keyword arguments of every site's trainer."""
    return dict(lr=cfg.lr, fedprox_mu=cfg.fedprox_mu, optimizer=cfg.optimizer, reset_optimizer=cfg.reset_optimizer,
                intensity_augmentation=cfg.intensity_augmentation, augmentation_prob=cfg.augmentation_prob)


def server_step(cfg: LoopConfig, global_w: Dict[str, np.ndarray], avg: Dict[str, np.ndarray],
                velocity: Optional[Dict[str, np.ndarray]], param_names: set) -> tuple:
    """The next global model from the sites' average, and the server momentum: as FLARE's FedOpt, an SGD step on
    the parameters and the plain average for buffers (``server_lr=1, server_momentum=0`` is plain FedAvg)."""
    if cfg.server_lr == 1.0 and cfg.server_momentum == 0.0:
        return avg, velocity
    step = {k: global_w[k] - avg[k] for k in param_names}
    if velocity is None:
        velocity = {k: np.zeros_like(v) for k, v in step.items()}
    velocity = {k: cfg.server_momentum * velocity[k] + step[k] for k in step}
    return {k: (global_w[k] - cfg.server_lr * velocity[k]).astype(global_w[k].dtype)
            if k in param_names else avg[k] for k in global_w}, velocity


def run(cfg: LoopConfig, on_round=None) -> Dict[str, Any]:
    """Train ``cfg.rounds`` rounds; return per-round per-site val/test Dice and timings."""
    torch.set_num_threads(cfg.threads)
    syn, spec, sites = benchmark_of(cfg)
    start = time.time()
    data = {s: load_site_data(resolve_site_config(s, None, syn.modalities), spec, syn) for s in sites}
    device = torch.device("cpu")
    if cfg.method not in ("fedavg", "fedda", "fedda_stats", "ditto", "local", "pooled"):
        raise ValueError(f"unknown method {cfg.method!r}")
    if cfg.finetune_epochs and cfg.rounds < 1:
        raise ValueError("finetune_epochs fine-tunes the model received in the last round: it needs rounds >= 1")
    model_args = {"spatial_dims": syn.spatial_dims, "out_channels": syn.num_classes, **cfg.model,
                  **({"n_domains": len(sites)} if cfg.method == "fedda" else {})}
    name = model_args.pop("name", "unet_domain" if cfg.method == "fedda" else "unet")
    if cfg.method in ("local", "pooled"):
        return run_reference(cfg, syn, sites, data, name, model_args, start)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        global_model = build_model(name, **model_args)
    global_w = weights_to_numpy(global_model)
    param_names = {name for name, _ in global_model.named_parameters()}
    trainers = {}
    train_args = trainer_args(cfg)
    if cfg.holdout and cfg.holdout not in sites:
        raise ValueError(f"holdout {cfg.holdout!r} is not one of {sites}")
    train_sites = [s for s in sites if s != cfg.holdout]
    for i, s in enumerate(train_sites):
        torch.manual_seed(cfg.seed)
        if cfg.method == "fedda_stats":
            trainers[s] = StatisticsAlignmentTrainer(build_model(name, **model_args), device, i, len(train_sites),
                                                     syn.num_classes, adv_weight=cfg.adv_weight,
                                                     disc_lr=cfg.disc_lr, disc_hidden=cfg.disc_hidden, alignment=cfg.alignment,
                                                     **train_args)
        elif cfg.method == "fedda":
            trainers[s] = DomainAdversarialTrainer(build_model(name, **model_args), device, i,
                                                   adv_weight=cfg.adv_weight, head_lr=cfg.head_lr,
                                                   **train_args)
        elif cfg.keep_local == "head":
            model = build_model(name, **model_args)
            trainers[s] = PersonalHeadTrainer(model, device, private_keys=site_private_keys(model, ["head"]),
                                              head_steps=cfg.head_steps, inconsistency_weight=cfg.inconsistency_weight,
                                              **train_args)
        else:
            trainers[s] = SegmentationTrainer(build_model(name, **model_args), device, **train_args)
    personal = {}  # Ditto: each site's personal model, starting as the initial global model
    if cfg.method == "ditto":
        for s in train_sites:
            personal[s] = ProximalPersonalTrainer(build_model(name, **model_args), device,
                                                  ditto_lambda=cfg.ditto_lambda, **train_args)
            load_weights(personal[s].model, global_w, "global")
    n = {s: float(len(data[s].train)) for s in train_sites}
    local_keys = site_local_keys(global_model, cfg.keep_local)
    site_state = {s: {k: v for k, v in global_w.items() if k in local_keys} for s in sites}
    velocity: Optional[Dict[str, np.ndarray]] = None
    relayed: Dict[int, Any] = {}  # FedDA-stats: the sites' feature statistics of the previous round
    rounds: List[Dict[str, Any]] = []
    setup_s = time.time() - start
    train_s = eval_s = 0.0

    def evaluate(weights):
        k = syn.num_classes
        val, test = {}, {}
        for s in sites:  # the model deployed at each site: the global one with the site's local layers, if any
            load_weights(global_model, {**weights, **site_state[s]}, "global")
            val[s] = evaluate_segmentation(global_model, data[s].val, k, device)["dice"]
            test[s] = evaluate_segmentation(global_model, data[s].test, k, device)["dice"]
        return val, test

    def evaluate_personal():
        k = syn.num_classes
        return ({s: evaluate_segmentation(personal[s].model, data[s].val, k, device)["dice"] for s in personal},
                {s: evaluate_segmentation(personal[s].model, data[s].test, k, device)["dice"] for s in personal})

    for rnd in range(cfg.rounds + 1):
        t0 = time.time()
        val, test = evaluate(global_w)
        entry = {"round": rnd, "val": val, "test": test}
        if personal:  # the sites deploy their personal models; the global model is kept beside them
            entry.update(global_val=val, global_test=test)
            entry["val"], entry["test"] = evaluate_personal()
        if cfg.method == "fedda":
            entry["domain_acc"] = {s: domain_accuracy(global_model, data[s].val, i, device)
                                   for i, s in enumerate(train_sites)}
        if cfg.probe_every and (rnd % cfg.probe_every == 0 or rnd == cfg.rounds):
            load_weights(global_model, global_w, "global")
            entry["probe"] = linear_probe_accuracy(
                *site_feature_set(global_model, {s: data[s].test for s in sites}, device), seed=cfg.seed)
        eval_s += time.time() - t0
        rounds.append(entry)
        if on_round:
            on_round(rounds[-1])
        if rnd == cfg.rounds:
            break
        t0 = time.time()
        updates = {}
        reported: Dict[int, Any] = {}
        if rnd == cfg.rounds - 1:  # fine-tuning starts from the model the sites receive in the last round
            finetune_start = {s: {**global_w, **site_state[s]} for s in train_sites}
        for i, s in enumerate(train_sites):
            tr = trainers[s]
            load_weights(tr.model, {**global_w, **site_state[s]}, "global")
            tr.set_lr(round_lr(cfg.lr, cfg.lr_schedule, rnd, cfg.rounds))
            if cfg.method in ("fedda", "fedda_stats"):
                tr.current_weight = adversarial_weight(rnd, cfg.adv_weight, cfg.warmup_rounds)
            if cfg.method == "fedda_stats":
                reported[i] = site_feature_statistics(tr.model, data[s].train, syn.num_classes, device)
                tr.set_peer_statistics(relayed)
            tr.fit(data[s].train, cfg.local_epochs, cfg.batch_size, seed=cfg.seed * 1000 + rnd)
            if s in personal:
                personal[s].set_lr(tr.lr)
                personal[s].set_anchor({k: torch.as_tensor(v) for k, v in {**global_w, **site_state[s]}.items()})
                personal[s].fit(data[s].train, cfg.personal_epochs, cfg.batch_size, seed=cfg.seed * 1000 + rnd)
            updates[s] = weights_to_numpy(tr.model)
            site_state[s] = {k: v for k, v in updates[s].items() if k in local_keys}
        relayed = reported
        global_w, velocity = server_step(cfg, global_w, weighted_average(updates, sample_weights(n)), velocity,
                                         param_names)
        train_s += time.time() - t0
    load_weights(global_model, global_w, "global")
    probe = linear_probe_accuracy(*site_feature_set(global_model, {s: data[s].test for s in sites}, device),
                                  seed=cfg.seed)
    result = summarise_run(cfg, sites, rounds, probe, {"setup": setup_s, "train": train_s, "eval": eval_s})
    if cfg.finetune_epochs:
        result["finetune"] = finetune(cfg, syn, data, trainers, finetune_start)
    result["raw_probe"] = linear_probe_accuracy(*site_histogram_set({s: data[s].test for s in sites}), seed=cfg.seed)
    return result


def finetune(cfg: LoopConfig, syn, data: Dict[str, Any], trainers: Dict[str, Any],
             start: Dict[str, Dict[str, np.ndarray]]) -> Dict[str, Any]:
    """Local fine-tuning for deployment (the executors' ``finetune_epochs``): each site trains the global model it
    received in the last round (with its own layers), ``start[site]``, alone for ``cfg.finetune_epochs`` epochs with
    its own trainer, seeded as the executor does; validation and test Dice after every epoch
    (``{"val": {site: [epoch 1, ...]}, "test": ...}``)."""
    out: Dict[str, Any] = {"val": {}, "test": {}}
    k = syn.num_classes
    device = torch.device("cpu")
    for s, weights in start.items():
        tr = trainers[s]
        load_weights(tr.model, weights, "global")
        tr.set_lr(round_lr(cfg.lr, cfg.lr_schedule, cfg.rounds - 1, cfg.rounds))
        out["val"][s], out["test"][s] = [], []
        for epoch in range(cfg.finetune_epochs):
            tr.fit(data[s].train, 1, cfg.batch_size, seed=cfg.seed * 1000 + cfg.rounds + epoch)
            out["val"][s].append(evaluate_segmentation(tr.model, data[s].val, k, device)["dice"])
            out["test"][s].append(evaluate_segmentation(tr.model, data[s].test, k, device)["dice"])
    return out


def site_local_keys(model: torch.nn.Module, keep_local: str) -> set:
    """``state_dict`` keys that stay at the sites: none, every normalisation layer's entries (``"norm"``, FedBN)
    or only their running statistics (``"norm_stats"``, SiloBN)."""
    if keep_local == "none":
        return set()
    if keep_local == "head":  # the output head and any calibration modules (FedLC, FedDP)
        return site_private_keys(model, ["head"])
    if keep_local not in ("norm", "norm_stats", "first_norm"):
        raise ValueError(f"keep_local must be none, norm, norm_stats, first_norm or head, got {keep_local!r}")
    # "first_norm": only the normalisation layer right after the input convolution (local_norm="first" of the jobs)
    return norm_layer_keys(model, statistics_only=keep_local == "norm_stats", first_only=keep_local == "first_norm")


def run_reference(cfg: LoopConfig, syn, sites: List[str], data: Dict[str, Any], name: str,
                  model_args: Dict[str, Any], start: float) -> Dict[str, Any]:
    """``local`` (each site trains alone) or ``pooled`` (one model on every site's training data): ``rounds``
    epochs of the same trainer, evaluated after each epoch like a federated round."""
    from torch.utils.data import ConcatDataset

    device = torch.device("cpu")
    owners = sites if cfg.method == "local" else ["pooled"]
    trainers = {}
    for owner in owners:
        torch.manual_seed(cfg.seed)
        trainers[owner] = SegmentationTrainer(build_model(name, **model_args), device, **trainer_args(cfg))
    train_sets = {s: data[s].train for s in sites} if cfg.method == "local" else \
        {"pooled": ConcatDataset([data[s].train for s in sites])}
    k = syn.num_classes

    def model_of(site):
        return trainers[site if cfg.method == "local" else "pooled"].model

    rounds = []
    for rnd in range(cfg.rounds + 1):
        rounds.append({"round": rnd,
                       "val": {s: evaluate_segmentation(model_of(s), data[s].val, k, device)["dice"] for s in sites},
                       "test": {s: evaluate_segmentation(model_of(s), data[s].test, k, device)["dice"]
                                for s in sites}})
        if rnd == cfg.rounds:
            break
        for owner in owners:
            trainers[owner].set_lr(round_lr(cfg.lr, cfg.lr_schedule, rnd, cfg.rounds))
            trainers[owner].fit(train_sets[owner], cfg.local_epochs, cfg.batch_size, seed=cfg.seed * 1000 + rnd)
    return summarise_run(cfg, sites, rounds, None, {"setup": 0.0, "train": time.time() - start, "eval": 0.0})


def summarise_run(cfg: LoopConfig, sites: List[str], rounds: List[Dict[str, Any]], probe: Optional[float],
                  seconds: Dict[str, float]) -> Dict[str, Any]:
    """The record of one run: per-round figures plus final, best-on-validation and last-5 summaries."""
    mean_test = [float(np.mean(list(r["test"].values()))) for r in rounds]
    worst_test = [float(np.min(list(r["test"].values()))) for r in rounds]
    mean_val = [float(np.mean(list(r["val"].values()))) for r in rounds]
    best = int(np.argmax(mean_val[1:])) + 1
    return {"probe_accuracy": probe, "config": cfg.__dict__, "sites": sites, "rounds": rounds,
            "mean_test": mean_test, "worst_test": worst_test, "mean_val": mean_val, "best_round": best,
            "best_test_mean": mean_test[best], "stability": round_stability(mean_test[1:]),
            "val_stability": round_stability(mean_val[1:]), "seconds": seconds}


def summary_line(result: Dict[str, Any], label: str) -> str:
    st = result["stability"]
    probe = result["probe_accuracy"]
    return (f"{label:45s} final {result['mean_test'][-1]:.3f} worst {result['worst_test'][-1]:.3f} "
            f"last5 {st['last5_mean']:.3f} swing {st['last5_max_change']:.3f} best@val {result['best_test_mean']:.3f} "
            + (f"probe {probe:.2f} " if probe is not None else "") + f"({result['seconds']['train']:.0f}s)")


def summarise(paths: Sequence[str]) -> str:
    """Markdown table of JSON-lines results: one row per setting (label without its seed), mean over seeds."""
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                result = json.loads(line)
                variant = result["config"]["synthetic"].get("variant", "blobs")
                dims = result["config"]["synthetic"].get("spatial_dims", 2)
                cfg = result["config"]
                settings = (f"{cfg['optimizer']} lr {cfg['lr']}, optimiser {'reset' if cfg['reset_optimizer'] else 'kept'}"
                            f", {cfg['local_epochs']} epoch(s), server momentum {cfg['server_momentum']}"
                            + (f", {cfg['lr_schedule']} lr" if cfg.get("lr_schedule", "constant") != "constant" else "")
                            + (f", FedDA adv_weight {cfg['adv_weight']}" if cfg.get("method") == "fedda" else ""))
                key = f"{variant} {dims}D | {settings}"
                groups.setdefault(key, []).append(result)
    lines = ["| benchmark | settings | seeds | final mean | final worst | last-5 mean | largest last-5 change |",
             "|---|---|---|---|---|---|---|"]
    for key, runs in groups.items():
        bench, label = key.split(" | ", 1)

        def avg(get):
            return float(np.mean([get(r) for r in runs]))

        seeds = ",".join(str(r["config"]["seed"]) for r in runs)
        lines.append(f"| {bench} | {label} | {seeds} | {avg(lambda r: r['mean_test'][-1]):.3f} | "
                     f"{avg(lambda r: r['worst_test'][-1]):.3f} | {avg(lambda r: r['stability']['last5_mean']):.3f} | "
                     f"{avg(lambda r: r['stability']['last5_max_change']):.3f} |")
    return "\n".join(lines)


def print_round(entry: Dict[str, Any]) -> None:
    print(f"  round {entry['round']:3d} test " + " ".join(f"{s} {d:.3f}" for s, d in entry["test"].items()),
          flush=True)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", default=[], help="key=value settings of LoopConfig")
    ap.add_argument("--grid", nargs="*", default=[], help="key=v1,v2 ... swept as a product")
    ap.add_argument("--synthetic", default="{}", help="JSON settings of the benchmark (merged into the default)")
    ap.add_argument("--out", help="append results as JSON lines to this file")
    ap.add_argument("--label", help="method label of the records (default: the settings); the seed is appended")
    ap.add_argument("--verbose", action="store_true", help="print every round's test Dice per site")
    ap.add_argument("--summarise", nargs="+", metavar="JSONL", help="print a table of earlier results and exit")
    args = ap.parse_args(argv)
    if args.summarise:
        print(summarise(args.summarise))
        return
    base = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    grid = [(k, [parse_value(x) for x in v.split(",")]) for k, v in (item.split("=", 1) for item in args.grid)]
    synthetic = {"modalities": ["t1", "t2", "ct"], **json.loads(args.synthetic)}
    for combo in itertools.product(*[values for _, values in grid]) if grid else [()]:
        settings = {**base, **{k: v for (k, _), v in zip(grid, combo)}}
        for seed in args.seeds:
            cfg = LoopConfig(rounds=args.rounds, seed=seed, synthetic=dict(synthetic), **settings)
            result = run(cfg, on_round=print_round if args.verbose else None)
            label = (args.label or ",".join(f"{k}={v}" for k, v in settings.items())) + f" s{seed}"
            print(summary_line(result, label), flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps({"label": label, "settings": settings, **result}) + "\n")


if __name__ == "__main__":
    main()
