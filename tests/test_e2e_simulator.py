"""End-to-end: the segmentation jobs run in the FLARE simulator (3 sites, 2 rounds) and leave complete results."""

import json
import os

import pytest
import torch

from flare_runs import check_run, error_lines, initial_and_final_dice, prepare_job, run_simulator

SITES = ["site-1", "site-2", "site-3"]
ROUNDS = 2


@pytest.mark.slow
@pytest.mark.parametrize("job_name", ["fedavg", "fedprox", "fedbn", "fedda", "fedda_domain", "fedda_cyclic",
                                      "fedda_stats"])
def test_job_runs_and_improves(job_name, tmp_path):
    job = prepare_job(job_name, str(tmp_path), num_rounds=ROUNDS)
    ws = str(tmp_path / "ws")
    proc = run_simulator(job, ws, n_clients=3)
    with open(ws + ".out") as f:
        output = f.read()
    assert proc.returncode == 0, output[-3000:]
    assert not error_lines(ws), error_lines(ws)[:10]
    # the checkpoints load into the network their provenance names (domain head, affine norms, 4 classes)
    summary = check_run(os.path.join(ws, "server", "simulate_job"), SITES, ROUNDS)
    initial, final = initial_and_final_dice(summary)
    assert final > initial + 0.05, f"final mean Dice {final:.3f} not above the initial model's {initial:.3f}"
    if job_name == "fedda_cyclic":  # round 1: every site aligns to its ring neighbour's round-0 encoder
        assert "round 1 relay (site <- encoder of): site-1 <- site-3, site-2 <- site-1, site-3 <- site-2" in output
    if job_name == "fedda_stats":  # round 1: every site aligns with the other two sites' round-0 statistics
        with open(os.path.join(ws, "site-2", "log.txt")) as f:
            assert "round 1: aligning encoder features with the statistics of ['site-1', 'site-3']" in f.read()
    elif job_name.startswith("fedda") and job_name != "fedda_domain":
        with open(os.path.join(ws, "site-2", "log.txt")) as f:
            expected = "encoder of site-1" if job_name == "fedda_cyclic" else "encoder of the global model"
            assert f"round 1: aligning encoder features to the {expected}" in f.read()
    if job_name == "fedda_domain":
        with open(os.path.join(ws, "site-2", "log.txt")) as f:
            assert "round 1: confusing the received domain head" in f.read()
        assert all("domain_acc" in m for r in summary["rounds"] for m in r["sites"].values())
    if job_name == "fedbn":  # the global checkpoint's norm layers never moved: no site sent them
        ckpt = torch.load(os.path.join(ws, "server", "simulate_job", "app_server", "FL_global_model.pt"),
                          weights_only=True)["model"]
        norm = [k for k in ckpt if k.endswith("adn.N.weight")]
        assert norm and all(torch.equal(ckpt[k], torch.ones_like(ckpt[k])) for k in norm)
    if job_name == "fedprox":
        with open(os.path.join(ws, "site-1", "simulate_job", "app_site-1", "config", "config_fed_client.json")) as f:
            assert json.load(f)["executors"][0]["executor"]["args"]["fedprox_mu"] > 0
        # its effect: every site trained with the proximal term, reported (mean of the last epoch) and positive
        assert all(m["train_prox"] > 0 for r in summary["rounds"] for m in r["sites"].values()), summary["rounds"]
    elif job_name == "fedavg":
        assert not any("train_prox" in m for r in summary["rounds"] for m in r["sites"].values())


@pytest.mark.slow
def test_client_state_survives_worker_restarts(tmp_path):
    """With fewer threads than sites FLARE restarts the worker for every task; the local model and optimiser
    state are restored from the site's app folder, so cross-site evaluation still gets every local model."""
    job = prepare_job("fedavg", str(tmp_path), num_rounds=2, client_args={"synthetic": {"n_train": 32, "n_val": 8}})
    ws = str(tmp_path / "ws")
    proc = run_simulator(job, ws, n_clients=2, threads=1)
    assert proc.returncode == 0
    assert not error_lines(ws), error_lines(ws)[:10]
    with open(os.path.join(ws, "site-1", "log.txt")) as f:
        assert "restored client state (after 1 rounds)" in f.read()
    check_run(os.path.join(ws, "server", "simulate_job"), ["site-1", "site-2"], 2)
    # two sites of a three-site job: the run says so, and which -n gives the job's federation
    with open(os.path.join(ws, "server", "log.txt")) as f:
        assert "federation is 3 sites (min_clients) but 2 are connected" in f.read()


@pytest.mark.slow
def test_bad_site_data_stops_the_run_naming_the_file(tmp_path):
    """A site whose datalist lists a missing image stops with an error naming the file; the run ends."""
    missing = str(tmp_path / "data" / "missing_image.nii.gz")
    datalist = tmp_path / "site2.json"
    datalist.write_text(json.dumps({"training": [{"image": missing, "label": missing}],
                                    "validation": [{"image": missing, "label": missing}]}))
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"sites": {"site-1": {"synthetic": {"modality": "t1"}},
                                            "site-2": {"datalist": str(datalist)}}}))
    job = prepare_job("fedavg", str(tmp_path), num_rounds=2, client_args={"synthetic": {"n_train": 16, "n_val": 4}},
                      server_args={"min_clients": 2})
    ws = str(tmp_path / "ws")
    run_simulator(job, ws, n_clients=2, env={"MEDFLARE_SITE_CONFIG": str(config)}, timeout=600)
    errors = error_lines(ws)
    assert any("site 'site-2'" in e and "missing_image.nii.gz" in e for e in errors), errors[:10]
    assert not os.path.exists(os.path.join(ws, "server", "simulate_job", "app_server", "best_FL_global_model.pt"))


def _final_weights(ws):
    import torch

    path = os.path.join(ws, "server", "simulate_job", "app_server", "FL_global_model.pt")
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.mark.slow
@pytest.mark.parametrize("job_name,n_sites,args", [
    ("fedavg", 3, {"synthetic": {"n_train": 24, "n_val": 8, "n_test": 8}}),
    ("fedavg_cls", 4, {"synthetic": {"n_train": 24, "n_val": 8, "n_test": 16}}),
])
def test_same_job_and_seed_give_the_same_model_bit_for_bit(job_name, n_sites, args, tmp_path):
    """Reproducibility: one thread per site, seeded shuffling and initialisation, and rounds that wait for every
    site make two runs of a job give identical global models."""
    finals = []
    for k in range(2):
        job = prepare_job(job_name, str(tmp_path / f"job{k}"), num_rounds=2, client_args=args)
        ws = str(tmp_path / f"ws{k}")
        proc = run_simulator(job, ws, n_clients=n_sites)
        assert proc.returncode == 0, open(ws + ".out").read()[-3000:]
        finals.append(_final_weights(ws))
    assert finals[0].keys() == finals[1].keys()
    for key, value in finals[0].items():
        assert torch_equal(value, finals[1][key]), f"{job_name}: parameter {key} differs between identical runs"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
