"""The job folders are generated from one spec (tools/jobspec.py); the generator checks classes and arguments."""

import json
import os
import sys

import pytest

from flare_config import Component, JobConfigError, check_component
from jobspec import JOBS, folder_differences, get_job, job_files, write_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from sync_jobs import config_differences  # noqa: E402


def test_committed_jobs_are_what_the_spec_generates():
    stale = config_differences()
    assert not stale, f"job folders differ from tools/jobspec.py (run python tools/sync_jobs.py): {stale}"


def _server(spec):
    return job_files(spec)["app/config/config_fed_server.json"]


def _component(config, component_id):
    return next(c for c in config["components"] if c["id"] == component_id)


def test_persistor_model_follows_the_executor():
    spec = get_job("fedavg").with_changes(executor_args={"spatial_dims": 3, "spatial_size": [32, 32, 32],
                                                                 "num_classes": 2})
    model = _component(_server(spec), "persistor")["args"]["model"]
    assert model == {"name": "unet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2}
    domain = _component(_server(JOBS["fedda_domain"]), "persistor")["args"]["model"]
    assert domain["name"] == "unet_domain" and domain["n_domains"] == 3


def test_changes_keep_meta_server_and_sites_consistent(tmp_path):
    spec = get_job("fedism").with_changes(num_rounds=2, n_sites=20, aggregator_args={"q": 0.0},
                                          executor_args={"seed": 3, "synthetic": {"n_train": 8}})
    files = job_files(spec)
    server, client = files["app/config/config_fed_server.json"], files["app/config/config_fed_client.json"]
    assert files["meta.json"]["min_clients"] == server["min_clients"] == 20 and server["num_rounds"] == 2
    args = client["executors"][0]["executor"]["args"]
    assert args["seed"] == 3 and _component(server, "persistor")["args"]["seed"] == 3
    assert args["synthetic"] == {"n_train": 8, "n_val": 64, "n_test": 200, "seed": 0}  # merged, not replaced
    assert _component(server, "aggregator")["args"] == {"q": 0.0, "beta": 0.5}
    job = write_job(spec, str(tmp_path), code=False)
    with open(os.path.join(job, "meta.json")) as f:
        assert json.load(f)["deploy_map"] == {"app": ["@ALL"]}
    assert folder_differences(spec, job) == []
    assert not os.path.exists(os.path.join(job, "app", "custom"))


def test_generator_refuses_unknown_classes_and_arguments():
    with pytest.raises(JobConfigError, match="cannot import"):
        check_component(Component("medflare.flare.aggregators.NoSuchAggregator"))
    with pytest.raises(JobConfigError, match=r"takes no argument \['qq'\]"):
        job_files(get_job("fedism").with_changes(aggregator_args={"qq": 1.0}))
    with pytest.raises(JobConfigError, match="no_such_setting"):
        job_files(get_job("fedavg").with_changes(executor_args={"no_such_setting": 1}))
    with pytest.raises(ValueError, match="unknown job"):
        get_job("fedsomething")


def test_named_sites_run_the_intended_federation():
    for name, spec in JOBS.items():
        meta = job_files(spec)["meta.json"]
        assert meta["min_clients"] == (3 if spec.key_metric == "dice" else 4), name
