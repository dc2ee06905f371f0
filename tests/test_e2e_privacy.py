"""End-to-end: FLARE's privacy filters on a medflare job in the simulator (2 sites, 2 rounds, small data). Each
filter's output reaches the aggregator, is accepted, and the global model stays sane: finite, changed, and still
scoring about as well as without filtering."""

import os

import numpy as np
import pytest
import torch

from flare_runs import add_result_filter, check_run, initial_and_final_dice, prepare_job, run_cleanly
from medflare.networks import build_model

SITES = ["site-1", "site-2"]
SMALL = {"synthetic": {"n_train": 32, "n_val": 8, "n_test": 8}}
EXCLUDED = "model.2.1.conv.unit0.conv.bias"  # the output layer's bias: kept at every site
FILTERS = {
    "exclude_vars": ("nvflare.app_common.filters.exclude_vars.ExcludeVars",
                     {"exclude_vars": "^model\\.2\\.1\\.conv\\.unit0\\.conv\\.bias$"}, False),
    "percentile": ("nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                   {"percentile": 10, "gamma": 0.01, "data_kinds": ["WEIGHT_DIFF"]}, True),
    "svt": ("nvflare.app_common.filters.svt_privacy.SVTPrivacy",
            # FLARE's SVT adds Laplace noise of scale 2 gamma / noise_var to the shared entries
            {"fraction": 0.5, "epsilon": 1000.0, "noise_var": 100.0, "gamma": 1e-3, "data_kinds": ["WEIGHT_DIFF"]},
            True),
}


def _initial_model():
    torch.manual_seed(0)  # as the job's persistor (seed 0)
    from jobspec import JOBS, persistor_model

    return {k: v.numpy() for k, v in build_model(**persistor_model(JOBS["fedavg"].executor)).state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FILTERS))
def test_job_with_privacy_filter_gives_a_sane_model(name, tmp_path):
    path, args, diff = FILTERS[name]
    job = prepare_job("fedavg", str(tmp_path), num_rounds=2,
                      client_args={**SMALL, "send_weight_differences": diff}, server_args={"min_clients": 2})
    add_result_filter(job, path, args)
    ws = str(tmp_path / "ws")
    run_cleanly(job, ws, n_clients=2)
    run_dir = os.path.join(ws, "server", "simulate_job")
    summary = check_run(run_dir, SITES, 2)
    final = torch.load(os.path.join(run_dir, "app_server", "FL_global_model.pt"), map_location="cpu",
                       weights_only=True)["model"]
    initial = _initial_model()
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    moved = sum(float(np.abs(final[k].numpy().astype(np.float64) - initial[k]).sum()) for k in initial)
    assert moved > 0, "the global model did not change"
    start, end = initial_and_final_dice(summary)
    assert end > start - 0.02, f"{name}: final mean Dice {end:.3f}, initial {start:.3f}"
    with open(os.path.join(ws, "site-1", "log.txt")) as f:
        site_log = f.read()
    assert ("results as WEIGHT_DIFF" in site_log) == diff
    if name == "exclude_vars":  # nobody sent the parameter, so it kept its initial value
        np.testing.assert_array_equal(final[EXCLUDED].numpy(), initial[EXCLUDED])
        with open(os.path.join(ws, "server", "log.txt")) as f:
            assert "sent 25 of the 26 parameters" in f.read()
