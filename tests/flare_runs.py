"""Helpers for end-to-end tests that run medflare jobs in FLARE and check what a run leaves behind."""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from jobtools import copy_job, run_simulator  # noqa: E402,F401

from medflare.networks import build_model  # noqa: E402

ERROR_LINE = re.compile(r" - (ERROR|CRITICAL) - ")


def prepare_job(name: str, dest: str, num_rounds: int = 2, client_args: Optional[Dict[str, Any]] = None,
                server_args: Optional[Dict[str, Any]] = None) -> str:
    """A shortened copy of ``jobs/<name>`` (see :func:`jobtools.copy_job`)."""
    return copy_job(name, dest, num_rounds=num_rounds, client_args=client_args, server_args=server_args)


def add_result_filter(job: str, path: str, args: Dict[str, Any], tasks: Sequence[str] = ("train",)) -> None:
    """Add a FLARE result filter (``path``, ``args``) to the client config of a copied job, for ``tasks``."""
    config_path = os.path.join(job, "app", "config", "config_fed_client.json")
    with open(config_path) as f:
        config = json.load(f)
    config.setdefault("task_result_filters", []).append({"tasks": list(tasks),
                                                         "filters": [{"path": path, "args": args}]})
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)


def run_cleanly(job: str, workspace: str, n_clients: int) -> str:
    """Run ``job`` in the simulator; assert it exits 0 with no ERROR line in any log; return its console output."""
    proc = run_simulator(job, workspace, n_clients=n_clients)
    with open(workspace + ".out") as f:
        output = f.read()
    assert proc.returncode == 0, output[-3000:]
    errors = error_lines(workspace)
    assert not errors, errors[:10]
    return output


def error_lines(workspace: str) -> List[str]:
    """ERROR/CRITICAL lines of every server and site log of a workspace."""
    lines = []
    for log in glob.glob(os.path.join(workspace, "**", "log.txt"), recursive=True):
        with open(log, errors="replace") as f:
            lines += [f"{os.path.relpath(log, workspace)}: {ln.strip()}" for ln in f if ERROR_LINE.search(ln)]
    return lines


def load_checkpoint_into_model(path: str, model_args: Optional[Dict[str, Any]] = None) -> torch.nn.Module:
    """Load a persisted global model into a freshly built network (fails if the keys or shapes differ); without
    ``model_args``, the network its provenance record names."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if model_args is None:
        model_args = dict(ckpt["medflare_provenance"]["model"]) if "medflare_provenance" in ckpt else {}
    model = build_model(**{"name": "unet", **model_args})
    model.load_state_dict(ckpt["model"])
    return model


def check_run(run_dir: str, sites: Sequence[str], num_rounds: int, model_args: Optional[Dict[str, Any]] = None,
              local_models: bool = True, site_curves: bool = True) -> Dict[str, Any]:
    """Assert what every completed segmentation run must leave in its server run dir; returns the summary.

    ``local_models``: the cross-site evaluation covered the sites' local models (``False``: it must not have).
    ``site_curves``: the sites streamed TensorBoard events to the server (``False``: none may have arrived)."""
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        path = os.path.join(run_dir, "app_server", name)
        assert os.path.isfile(path), f"missing {name}"
        load_checkpoint_into_model(path, model_args)
    with open(os.path.join(run_dir, "cross_site_val", "cross_val_results.json")) as f:
        cross = json.load(f)
    assert sorted(cross) == sorted(sites), f"cross-site results cover {sorted(cross)}, expected {sorted(sites)}"
    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    assert [r["round"] for r in summary["rounds"]] == list(range(num_rounds))
    for entry in summary["rounds"]:
        assert sorted(entry["sites"]) == sorted(sites)
        assert entry["fairness"]["n_sites"] == len(sites)
    matrix = summary["cross_site"]["matrix"]
    for model in ["global", "best_global", *(sites if local_models else [])]:
        assert sorted(matrix[model]) == sorted(sites), f"cross-site row {model} covers {sorted(matrix[model])}"
    if not local_models:
        assert sorted(matrix) == ["best_global", "global"], f"local models were evaluated: {sorted(matrix)}"
    test = summary["test"]
    assert test["split"] == "test" and sorted(test["matrix"]["global"]) == sorted(sites)
    assert [c["round"] for c in test["rounds"]] == list(range(num_rounds + 1))  # received models + the final one
    assert test["global"]["mean"] == pytest.approx(summary["cross_site"]["global"]["mean"])
    assert test["last5"]["n_models"] == min(5, num_rounds + 1) and test["best_global"] is not None
    for name in ("round_metrics.csv", "fairness.csv", "cross_site_dice.csv"):
        assert os.path.isfile(os.path.join(run_dir, "metrics", name)), f"missing metrics/{name}"
    for site in sites:
        events = glob.glob(os.path.join(run_dir, "tb_events", site, "events.*"))
        assert bool(events) == site_curves, f"TensorBoard events of {site}: {events} (expected: {site_curves})"
    assert glob.glob(os.path.join(run_dir, "tb_events", "server", "events.*"))
    return summary


def initial_and_final_dice(summary: Dict[str, Any]) -> tuple:
    """Mean Dice of the initial model (round 0, as the sites measured it) and of the final global model (CSE)."""
    initial = summary["rounds"][0]["fairness"]["mean"]
    final = summary["cross_site"]["global"]["mean"]
    return initial, final
