"""Resume after a server crash: the server's resume checkpoint (unit tests) and, in the simulator, a job stopped
after round 1 and resumed from its checkpoint that ends with the same global model, bit for bit, as the run that was
never interrupted (server optimiser momentum and run summary included)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from flare_runs import REPO, error_lines, prepare_job, run_simulator
from medflare.keys import AGGREGATOR_STATE_KEY as STATE_KEY
from medflare.flare.resume import (RESUME_FILE, ResumeError, ResumeState, check_resume_fits, load_resume_state,
                                   save_resume_state, summary_before)

sys.path.insert(0, os.path.join(REPO, "deploy"))
from resume_job import resume_job, set_resume_from  # noqa: E402
from stage_job import StageError  # noqa: E402


def _state(next_round=2, num_rounds=4):
    meta = {STATE_KEY: {"rule": "fedism", "round": 1, "state": {"weights": {"site-1": 0.25, "site-2": 0.75}}},
            "medflare_aggregation_weights": {"site-1": np.float64(0.25), "site-2": 0.75}}
    return ResumeState(next_round=next_round, num_rounds=num_rounds,
                       weights={"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, np.float32)}, meta=meta,
                       relay_encoders={"site-1": {"w": np.ones(4, np.float32)}},
                       server_optimizer={"optimizer": {"state": {0: {"momentum_buffer": torch.ones(4)}},
                                                       "param_groups": [{"lr": 1.0, "params": [0]}]}},
                       summary={"key_metric": "dice", "rounds": [{"round": 0}, {"round": 1}, {"round": 2}],
                                "cross_site": {"x": 1}})


def test_resume_checkpoint_round_trip_keeps_fairness_relay_and_optimiser_state(tmp_path):
    path = str(tmp_path / RESUME_FILE)
    save_resume_state(path, _state())
    back = load_resume_state(path)
    assert (back.next_round, back.num_rounds) == (2, 4)
    np.testing.assert_array_equal(back.weights["w"], np.arange(4, dtype=np.float32))
    assert back.meta[STATE_KEY]["state"]["weights"] == {"site-1": 0.25, "site-2": 0.75}
    assert back.meta["medflare_aggregation_weights"]["site-1"] == 0.25
    np.testing.assert_array_equal(back.relay_encoders["site-1"]["w"], np.ones(4))
    assert torch.equal(back.server_optimizer["optimizer"]["state"][0]["momentum_buffer"], torch.ones(4))
    assert [r["round"] for r in summary_before(back.summary, 2)["rounds"]] == [0, 1]
    assert summary_before(back.summary, 2)["cross_site"] is None
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_bad_resume_checkpoints_are_errors_naming_the_file(tmp_path):
    path = str(tmp_path / RESUME_FILE)
    with pytest.raises(ResumeError, match="resume checkpoint not found: .*medflare_resume.pt"):
        load_resume_state(path)
    (tmp_path / RESUME_FILE).write_bytes(b"garbage")
    with pytest.raises(ResumeError, match=r"resume checkpoint .*medflare_resume.pt cannot be read"):
        load_resume_state(path)
    torch.save({"model": {}}, path)  # a model checkpoint, not a resume checkpoint
    with pytest.raises(ResumeError, match="not a medflare resume checkpoint"):
        load_resume_state(path)
    save_resume_state(path, _state())
    state = load_resume_state(path)
    with pytest.raises(ResumeError, match=r"holds another model: missing \['c'\], unexpected \['b'\]"):
        check_resume_fits(state, path, {"w", "c"}, 4)
    with pytest.raises(ResumeError, match="nothing left to run"):
        check_resume_fits(state, path, {"w", "b"}, 2)
    check_resume_fits(state, path, {"w", "b"}, 4)


def test_resume_command_stages_the_job_with_the_checkpoint(tmp_path):
    ckpt = str(tmp_path / RESUME_FILE)
    save_resume_state(ckpt, _state(next_round=2, num_rounds=4))
    staged = resume_job(os.path.join(REPO, "jobs", "fedda_cyclic"), ckpt, str(tmp_path / "out"),
                        executor_args={"local_epochs": 1})
    with open(os.path.join(staged, "app", "config", "config_fed_server.json")) as f:
        server = json.load(f)
    assert server["num_rounds"] == 4
    assert server["workflows"][0]["args"]["resume_from"] == ckpt
    save_resume_state(ckpt, _state(next_round=4, num_rounds=4))
    with pytest.raises(ResumeError, match="nothing left of 4 rounds"):
        resume_job(os.path.join(REPO, "jobs", "fedavg"), ckpt, str(tmp_path / "out"))
    old = tmp_path / "old" / "app" / "config"  # a job staged before the re-layout names the old class path
    os.makedirs(old)
    (old / "config_fed_server.json").write_text(json.dumps({"workflows": [
        {"id": "cse", "path": "medflare.workflows.CrossSiteEvaluation", "args": {}},
        {"id": "sag", "path": "medflare.workflows.RingRelayScatterAndGather", "args": {}}]}))
    set_resume_from(str(tmp_path / "old"), ckpt)
    workflows = json.loads((old / "config_fed_server.json").read_text())["workflows"]
    assert "resume_from" not in workflows[0]["args"] and workflows[1]["args"]["resume_from"] == ckpt
    os.makedirs(tmp_path / "plain" / "app" / "config")
    (tmp_path / "plain" / "app" / "config" / "config_fed_server.json").write_text(json.dumps({"workflows": []}))
    with pytest.raises(StageError, match="no controller that can resume"):
        set_resume_from(str(tmp_path / "plain"), ckpt)


def _final(ws):
    return torch.load(os.path.join(ws, "server", "simulate_job", "app_server", "FL_global_model.pt"),
                      map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
def test_resumed_run_ends_with_the_model_of_the_uninterrupted_run(tmp_path):
    """fedavg (server momentum 0.5), 2 sites: 3 rounds straight, versus 2 rounds then resumed for the third."""
    args = {"synthetic": {"n_train": 16, "n_val": 4, "n_test": 4}}

    ckpt = str(tmp_path / RESUME_FILE)  # the interrupted run's checkpoint, copied out (it survives a crash)
    jobs = {name: prepare_job("fedavg", str(tmp_path / f"job_{name}"), num_rounds=rounds, client_args=args,
                              server_args={"min_clients": 2})
            for name, rounds in (("straight", 3), ("interrupted", 2), ("resumed", 3))}  # one copy of the code
    set_resume_from(jobs["resumed"], ckpt)

    def run(name):
        ws = str(tmp_path / f"ws_{name}")
        proc = run_simulator(jobs[name], ws, n_clients=2, timeout=900)
        assert proc.returncode == 0, open(ws + ".out").read()[-3000:]
        assert not error_lines(ws), error_lines(ws)[:5]
        return ws

    straight = run("straight")
    interrupted = run("interrupted")
    shutil.copy(os.path.join(interrupted, "server", "simulate_job", "app_server", RESUME_FILE), ckpt)
    assert load_resume_state(ckpt).next_round == 2
    resumed = run("resumed")

    final, expected = _final(resumed), _final(straight)
    assert final.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(final[key], value), f"parameter {key} differs from the uninterrupted run"
    with open(os.path.join(resumed, "server", "simulate_job", "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(straight, "server", "simulate_job", "metrics", "metrics_summary.json")) as f:
        reference = json.load(f)
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
    for ours, theirs in zip(summary["rounds"], reference["rounds"]):
        assert ours["fairness"]["mean"] == theirs["fairness"]["mean"]
    assert summary["cross_site"]["global"]["mean"] == reference["cross_site"]["global"]["mean"]
