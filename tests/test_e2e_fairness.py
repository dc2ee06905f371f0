"""End-to-end: fairness-suite jobs run in the FLARE simulator (4 sites, 2 rounds, tiny data) and leave complete,
fairness-annotated results."""

import csv
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from flare_runs import REPO, error_lines, prepare_job, run_simulator

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fair_loop  # noqa: E402

from medflare.networks import build_model

SITES = ["site-1", "site-2", "site-3", "site-4"]
ROUNDS = 2
TINY = {"synthetic": {"n_train": 32, "n_val": 16, "n_test": 32}}
FAIRNESS_COLUMNS = ["bacc_mean", "bacc_worst", "bacc_std", "bacc_gap", "bacc_jain", "auc_mean", "auc_worst",
                    "test_clean_bacc", "test_corrupted_bacc", "test_clean_corrupted_gap"]
AGGREGATOR_LOG = {"fedism": "fedism aggregation weights", "qfedavg": "qfedavg aggregation weights",
                  "fedce": "fedce aggregation weights", "fedga": "fedga aggregation weights"}


def check_classification_run(run_dir, sites, num_rounds):
    """What every completed classification run must leave in its server run dir; returns the metrics summary."""
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        path = os.path.join(run_dir, "app_server", name)
        assert os.path.isfile(path), f"missing {name}"
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        build_model("tiny_cnn").load_state_dict(ckpt["model"])
    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    assert summary["key_metric"] == "bacc"
    assert [r["round"] for r in summary["rounds"]] == list(range(num_rounds))
    for entry in summary["rounds"]:
        assert sorted(entry["sites"]) == sorted(sites)
        for site, metrics in entry["sites"].items():
            assert 0.0 <= metrics["bacc"] <= 1.0 and 0.0 <= metrics["auc"] <= 1.0, (site, metrics)
            assert metrics["loss_global"] > 0
            assert 0.0 <= metrics["test_bacc"] <= 1.0 and metrics["n_test"] > 0, (site, metrics)
        assert entry["fairness"]["n_sites"] == len(sites)
        assert entry["fairness_auc"]["n_sites"] == len(sites)
        test = entry["global_test"]
        assert test["clean_corrupted_gap"] == pytest.approx(test["clean_bacc"] - test["corrupted_bacc"])
        assert sorted(entry["aggregation_weights"]) == sorted(sites)
        assert sum(entry["aggregation_weights"].values()) <= 1.0 + 1e-6
    with open(os.path.join(run_dir, "metrics", "fairness_cls.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == num_rounds and all(c in rows[0] for c in FAIRNESS_COLUMNS), rows[0].keys()
    assert sorted(summary["cross_site"]["matrix"]["global"]) == sorted(sites)
    held_out = summary["test"]  # reported on every site's test split, the final model from cross-site evaluation
    assert held_out["split"] == "test" and held_out["global"] is not None
    assert [c["round"] for c in held_out["rounds"]] == list(range(num_rounds + 1))
    for site in sites:
        assert glob.glob(os.path.join(run_dir, "tb_events", site, "events.*")), f"no TensorBoard events of {site}"
    assert glob.glob(os.path.join(run_dir, "tb_events", "server", "events.*"))
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("job_name", ["fedism", "qfedavg", "fedce", "fedga"])
def test_fairness_job_runs(job_name, tmp_path):
    job = prepare_job(job_name, str(tmp_path), num_rounds=ROUNDS, client_args=TINY)
    ws = str(tmp_path / "ws")
    proc = run_simulator(job, ws, n_clients=4, timeout=900)
    with open(ws + ".out") as f:
        output = f.read()
    assert proc.returncode == 0, output[-3000:]
    assert not error_lines(ws), error_lines(ws)[:10]
    summary = check_classification_run(os.path.join(ws, "server", "simulate_job"), SITES, ROUNDS)
    with open(os.path.join(ws, "server", "log.txt")) as f:
        assert AGGREGATOR_LOG[job_name] in f.read()
    last = summary["rounds"][-1]["sites"]
    if job_name == "fedism":
        assert all(m["sharpness"] > 0 for m in last.values())
        weights = summary["rounds"][0]["aggregation_weights"]
        assert len({round(w, 6) for w in weights.values()}) > 1  # sharpness weighting, not uniform
    if job_name == "fedga":  # round 1: every site reports the loss of its round-0 local model
        assert all(m["prev_local_round"] == 0 and "loss_prev_local" in m for m in last.values())
        # the cached local model is the one trained in round 0, not an alias of the model now loaded
        assert all(abs(m["loss_prev_local"] - m["loss_global"]) > 1e-6 for m in last.values())
        weights = summary["rounds"][1]["aggregation_weights"]
        assert len({round(w, 6) for w in weights.values()}) > 1
    if job_name == "fedce":
        assert all("fedce_minus_score" in m for m in last.values())
    # the in-process runner of the benchmarks follows the simulator's run to the last digit
    record = fair_loop.run(job_name, 0, ROUNDS, dict(TINY["synthetic"]), SITES)
    for entry, flare in zip(record["history"], summary["rounds"]):
        assert entry["test"] == {s: flare["sites"][s]["test_bacc"] for s in SITES}
        assert entry["weight"] == pytest.approx(flare["aggregation_weights"], rel=1e-12)
    assert {s: v["test"] for s, v in record["final"].items()} == summary["cross_site"]["matrix"]["global"]


@pytest.mark.slow
def test_fedga_statistics_survive_worker_restarts(tmp_path):
    """With fewer threads than sites FLARE restarts the worker for every task: the previous local model comes back
    from the site's app folder, so every site still reports FedGA's gap in round 1."""
    job = prepare_job("fedga", str(tmp_path), num_rounds=ROUNDS, client_args=TINY, server_args={"min_clients": 2})
    ws = str(tmp_path / "ws")
    proc = run_simulator(job, ws, n_clients=2, threads=1, timeout=900)
    assert proc.returncode == 0
    assert not error_lines(ws), error_lines(ws)[:10]
    with open(os.path.join(ws, "site-1", "log.txt")) as f:
        assert "restored client state (local model of round 0)" in f.read()
    summary = check_classification_run(os.path.join(ws, "server", "simulate_job"), SITES[:2], ROUNDS)
    assert all(m["prev_local_round"] == 0 for m in summary["rounds"][1]["sites"].values())


@pytest.mark.slow
def test_ten_sites_run_on_two_workers(tmp_path):
    """The scale path of ``benchmarks/overhead.py`` (``fedavg_cls@10/2``): ten sites take turns on two simulator
    workers, every site trains and is scored in the round, and cross-site evaluation scores the global model at every
    site (one round, so no best model besides the final one)."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import overhead

    cmd, env = overhead.runner_command("fedavg_cls@10/2", 1, str(tmp_path))
    assert cmd[-4:] == ["-n", "10", "-t", "2"]
    with open(tmp_path / "run.log", "w") as out:
        proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=1200)
    ws = str(tmp_path / "ws")
    assert proc.returncode == 0, (tmp_path / "run.log").read_text()[-3000:]
    assert not error_lines(ws), error_lines(ws)[:10]
    sites = [f"site-{i + 1}" for i in range(10)]
    run_dir = os.path.join(ws, "server", "simulate_job")
    ckpt = torch.load(os.path.join(run_dir, "app_server", "FL_global_model.pt"), map_location="cpu",
                      weights_only=False)
    build_model("tiny_cnn").load_state_dict(ckpt["model"])
    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        (entry,) = json.load(f)["rounds"]
    assert sorted(entry["sites"]) == sorted(sites) and entry["fairness"]["n_sites"] == 10
    assert all(0.0 <= m["bacc"] <= 1.0 and m["n_train"] > 0 for m in entry["sites"].values())
    assert sorted(m["quality"] for m in entry["sites"].values()).count("hq") == 8  # 10 // 5 corrupted sites
    with open(os.path.join(run_dir, "cross_site_val", "cross_val_results.json")) as f:
        cross = json.load(f)
    assert sorted(cross) == sorted(sites) and all(set(v) == {"SRV_FL_global_model.pt"} for v in cross.values())
