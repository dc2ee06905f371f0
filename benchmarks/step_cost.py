#!/usr/bin/env python3
"""Relative cost of one local training step of each method (FedAvg, FedProx, FedDA), measured interleaved.

Steps of the methods alternate (A, B, C, A, B, C, ...) on the same batches, so a busy machine slows all of them
alike and the ratios stay meaningful. Prints milliseconds per step (median) and the ratio to FedAvg.

    python benchmarks/step_cost.py --steps 40 --batch 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "custom"))

import torch  # noqa: E402

from medflare.algorithms.alignment import AdversarialSegmentationTrainer  # noqa: E402
from medflare.networks import build_model  # noqa: E402
from medflare.segmentation.training import SegmentationTrainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 1, args.size, args.size, device=device)
    labels = torch.randint(0, 3, (args.batch, 1, args.size, args.size), device=device)

    trainers = {"fedavg": SegmentationTrainer(build_model("unet"), device),
                "fedprox": SegmentationTrainer(build_model("unet"), device, fedprox_mu=0.01),
                "fedda": AdversarialSegmentationTrainer(build_model("unet"), device)}
    trainers["fedda"].set_target(trainers["fedda"].model.state_dict())
    for trainer in trainers.values():
        trainer.start_round()
        trainer.training_step(images, labels)  # warm-up
    times = {name: [] for name in trainers}
    for _ in range(args.steps):
        for name, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.training_step(images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fedavg"])
    print(f"device {device}, batch {args.batch}, {args.size}x{args.size}, {args.steps} steps each")
    print("| method | ms per step (median) | vs FedAvg |\n|---|---|---|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1000 * med:.1f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
