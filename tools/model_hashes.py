#!/usr/bin/env python3
"""Run jobs for a few rounds in the FLARE simulator and print a hash of every model they leave behind.

A refactor that must not change results runs this before and after and compares the two outputs: the global model
the server persisted (``FL_global_model.pt``), and each site's client state (its last local model, its personal model
and the discriminator where the job keeps them). A hash covers the tensors' names, dtypes, shapes and bytes in
name order, so it is the same exactly when the weights are bit-identical.

    python tools/model_hashes.py --jobs fedavg fedda --rounds 2 --out before.json
    python tools/model_hashes.py --jobs fedavg fedda --rounds 2 --compare before.json
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
import tempfile
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jobtools import copy_job, run_simulator  # noqa: E402

DEFAULT_JOBS = ["fedavg", "fedda", "fedda_cyclic", "fedda_domain", "fedda_stats", "fedism", "fedbn_ft", "ditto"]


def tensor_hash(tree: Any) -> str:
    """SHA-256 over every tensor or array in a nested dict, by sorted key path (name, dtype, shape and bytes)."""
    digest = hashlib.sha256()

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}/{key}", value[key])
            return
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            tensor = torch.as_tensor(value).detach().cpu().contiguous()
            digest.update(f"{prefix}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds every value exactly
                tensor = tensor.float()
            digest.update(tensor.numpy().tobytes())

    visit("", tree)
    return digest.hexdigest()


def run_hashes(job: str, rounds: int, n_sites: int, work: str) -> Dict[str, str]:
    """``{model: hash}`` of the server's last global model and of each site's client state after ``rounds``."""
    folder = copy_job(job, os.path.join(work, "jobs"), num_rounds=rounds)
    workspace = os.path.join(work, f"ws_{job}")
    proc = run_simulator(folder, workspace, n_clients=n_sites)
    if proc.returncode != 0:
        with open(workspace + ".out") as f:
            raise RuntimeError(f"job '{job}' failed:\n{f.read()[-3000:]}")
    hashes: Dict[str, str] = {}
    server = glob.glob(os.path.join(workspace, "**", "app_server", "FL_global_model.pt"), recursive=True)
    if len(server) != 1:
        raise RuntimeError(f"job '{job}': expected one FL_global_model.pt, found {server}")
    hashes["global"] = tensor_hash(torch.load(server[0], map_location="cpu", weights_only=True)["model"])
    for path in sorted(glob.glob(os.path.join(workspace, "**", "app_site-*", "medflare_*client_state.pt"),
                                 recursive=True)):
        site = os.path.basename(os.path.dirname(path))[len("app_"):]
        state = torch.load(path, map_location="cpu", weights_only=True)
        hashes[f"{site} state"] = tensor_hash(state)
    return hashes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS, help="jobs under jobs/ (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each run (default: %(default)s)")
    parser.add_argument("--sites", type=int, default=3, help="simulated sites (default: %(default)s)")
    parser.add_argument("--out", help="write the hashes to this JSON file")
    parser.add_argument("--compare", help="a JSON file of an earlier run: exit 1 if any hash differs")
    args = parser.parse_args(argv)

    results: Dict[str, Dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as work:
        for job in args.jobs:
            results[job] = run_hashes(job, args.rounds, args.sites, work)
            for model, value in results[job].items():
                print(f"{job:14s} {model:18s} {value[:16]}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if args.compare:
        with open(args.compare) as f:
            earlier = json.load(f)
        changed = [f"{job} {model}" for job, models in results.items() for model, value in models.items()
                   if earlier.get(job, {}).get(model) != value]
        print("identical to " + args.compare if not changed else "changed: " + ", ".join(changed))
        return 1 if changed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
