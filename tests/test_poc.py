"""POC end to end: ``poc/run_poc.py`` prepares a FLARE POC workspace (loopback, free port), installs the site
configs, starts the server and three sites, submits ``jobs/fedavg`` (2 rounds, tiny synthetic data), waits,
downloads the results and stops everything. The test then checks the results like the simulator end-to-end tests
do, that no log has ERROR lines, and that every process of the POC system is gone (stopping by id any survivor).
About 1.5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

from flare_processes import REPO, error_lines, isolated_env
from flare_runs import check_run
from processes import ProcessTracker, read_pid_files

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2", "site-3"]
NUM_ROUNDS = 2


def test_poc_runs_fedavg_end_to_end(tmp_path):
    workspace = tmp_path / "poc_run"
    env = isolated_env(str(tmp_path))
    cmd = [sys.executable, os.path.join(REPO, "poc", "run_poc.py"), "--job", os.path.join(REPO, "jobs", "fedavg"),
           "--sites", *SITES, "--workspace", str(workspace), "--num-rounds", str(NUM_ROUNDS),
           "--executor-arg", 'synthetic={"n_train": 32, "n_val": 8}', "--timeout", "420"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=600)
    finally:
        # safety net: whatever the runner did, no process of this POC system may outlive the test
        participants = glob.glob(str(workspace / "poc" / "*" / "prod_00" / "*"))
        tracker = ProcessTracker()
        for pid in read_pid_files(participants):
            tracker.add(pid)
        tracker.refresh()
        leftovers = tracker.alive()
        tracker.stop(grace=5.0)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not leftovers, f"POC processes still running after run_poc.py returned: {leftovers}"

    with open(workspace / "results" / "run_summary.json") as f:
        summary = json.load(f)
    assert summary["ok"] and summary["status"] == "FINISHED:COMPLETED", summary
    assert summary["stop"]["poc_stop"] == "ok" and not summary["stop"]["left_running"], summary["stop"]
    assert summary["ports"]["fed_learn_port"] not in (8002, 8003)

    results = summary["results"]
    run_dir = results["workspace"]
    assert results["cross_site_sites"] == SITES
    # the sites keep the secure defaults: no training curves streamed, no local model shared, and the staged job
    # evaluates the global models only
    check_run(run_dir, SITES, NUM_ROUNDS, local_models=False, site_curves=False)
    errors = error_lines([str(workspace / "poc"), run_dir])
    assert not errors, "\n".join(errors[:10])
    assert summary["error_lines"] == []

    # the site configs were applied after `poc prepare` wiped local/
    prod = glob.glob(str(workspace / "poc" / "*" / "prod_00"))[0]
    for i, site in enumerate(SITES):
        with open(os.path.join(prod, site, "local", "medflare_site.json")) as f:
            assert json.load(f) == {"synthetic": {"modality": ["t1", "t2", "ct"][i]}}
        assert os.path.isfile(os.path.join(prod, site, "local", "resources.json"))
    # the server keeps its jobs inside this POC workspace (never in the shared /tmp/nvflare default)
    with open(os.path.join(prod, "localhost", "local", "resources.json")) as f:
        server = json.load(f)
    manager = [c for c in server["components"] if c["id"] == "job_manager"][0]
    assert manager["args"]["uri_root"].startswith(str(workspace / "poc"))
