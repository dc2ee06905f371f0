"""Faults in a real FLARE system (POC: server and three sites as separate processes on loopback), each started from
its kit's ``startup/start.sh`` so that one participant can be crashed (SIGKILL of its restart loop, its server or
client process and its job processes, by id) and started again.

1. The server dies after round 1 of 4 of a fedavg job. FLARE 2.9 keeps no snapshot, so the job dies with it. The
   server is started again (the sites keep running: they reconnect by themselves, and the new server tells them to
   abort their processes of the dead job); ``deploy/resume_job.py`` stages the job from the old run folder's
   ``medflare_resume.pt``; the resumed job runs rounds 2 and 3 only, its metrics cover rounds 0-3, and its model is
   finite and better than the initial one.
2. One site dies in the middle of round 1 of 3 (``min_clients`` 2). The round closes with the two others after
   ``wait_time_after_min_received`` (10 s in the staged job), so do the later rounds; cross-site evaluation gives up
   on the dead site after its ``validation_timeout`` (60 s in the staged job); the summary shows which site dropped
   out. The server's ``heart_beat_timeout`` is 40 s here (600 s by default): FLARE 2.9 holds a finished job's status
   until every site reported its outcome, and a site that died is only given up when its heartbeat times out; if
   that happens after the job ended, the job is marked ``FINISHED:ABNORMAL`` although every round completed (see
   docs/deployment.md, section 4.7).

Each test starts its own system, is bounded by a hard time limit (SIGALRM) and by a timeout on every wait, and
stops every process it started by id. Measured on 2 shared CPU cores: 240 s (server) and 195 s (site).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest
import torch

from flare_processes import (REPO, error_lines, grep_logs, isolated_env, kill_participant, restart_kit, start_kit,
                             stop_all, wait_for_clients)
from flare_runs import load_checkpoint_into_model
from medflare.flare.resume import RESUME_FILE, load_resume_state
from processes import ProcessTracker, cmdline
from stage_job import stage_job

import run_poc

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2", "site-3"]
ADMIN = "admin@medflare.poc"  # project admin of poc/project.yml
TINY = {"synthetic": {"n_train": 32, "n_val": 8}}
TEST_LIMIT = 540  # hard limit of one test, seconds (SIGALRM; the system is stopped in the teardown)
TASK_LINE = "got task assignment: name=train"


class PocSystem:
    """A POC system of ``poc/project.yml`` (server ``localhost`` + ``SITES``) prepared by ``poc/run_poc.py``'s
    ``prepare`` (free loopback port, site configs installed), each participant started and tracked on its own."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.env = isolated_env(root)
        self.tracker = ProcessTracker()  # every process this test started
        self.parts: Dict[str, ProcessTracker] = {}  # the processes of each participant (latest start)
        self.sessions: List[Any] = []
        self.t0 = time.monotonic()
        self.timings: Dict[str, float] = {}
        args = argparse.Namespace(workspace=root, sites=SITES, port=None, code="shipped",
                                  values=os.path.join(REPO, "poc", "sites.json"))
        self.system = run_poc.prepare(args, self.env, os.path.join(root, "nvflare_cli.log"))
        self.prod = self.system["prod"]
        self.server = self.system["server"]
        self.mark("prepared")

    def mark(self, what: str) -> None:
        self.timings[what] = round(time.monotonic() - self.t0, 1)
        print(f"[{self.timings[what]:6.1f}s] {what}", flush=True)

    def kit(self, name: str) -> str:
        return os.path.join(self.prod, name)

    def set_server_resource(self, key: str, value: Any) -> None:
        """Set ``servers[0][key]`` of the server's ``local/resources.json`` (before the server starts)."""
        path = os.path.join(self.kit(self.server), "local", "resources.json")
        with open(path) as f:
            resources = json.load(f)
        resources["servers"][0][key] = value
        with open(path, "w") as f:
            json.dump(resources, f, indent=2)

    def start(self, name: str, restart: bool = False) -> None:
        part = ProcessTracker()
        (restart_kit if restart else start_kit)(self.kit(name), self.env, part)
        self.parts[name] = part
        for pid in part.procs:
            self.tracker.add(pid)

    def start_all(self) -> None:
        for name in [self.server] + SITES:
            self.start(name)
        wait_for_clients(self.session(), SITES)
        self.mark("server and sites up")

    def kill(self, name: str) -> List[int]:
        if name == self.server:  # admin sessions of the dead server would keep trying to reconnect
            for s in self.sessions:
                s.close()
            self.sessions = []
        self.tracker.refresh()
        killed = kill_participant(self.parts[name])
        self.mark(f"killed {name} ({len(killed)} processes)")
        return killed

    def session(self):
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        s = new_secure_session(ADMIN, self.system["admin_kit"], timeout=60)
        self.sessions.append(s)
        return s

    def stage(self, out: str, **kwargs) -> str:
        return stage_job(os.path.join(REPO, "jobs", "fedavg"), os.path.join(self.root, out),
                         executor_args=TINY, **kwargs)

    def server_run_dir(self, job_id: str) -> str:
        return os.path.join(self.kit(self.server), job_id)

    def site_job_log(self, site: str, job_id: str) -> str:
        return os.path.join(self.kit(site), job_id, "log.txt")

    def close(self) -> Dict[str, List[int]]:
        if self.sessions:
            try:
                self.sessions[-1].shutdown_system()
            except Exception as e:  # a dead participant, or the server already gone: stopped by id below
                print(f"shutdown_system: {e}")
        for s in self.sessions:
            try:
                s.close()
            except Exception:
                pass
        self.tracker.refresh()
        report = stop_all(self.tracker, grace=30.0)
        self.mark(f"stopped: {report}")
        return report


@pytest.fixture
def poc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the admin API in this process keeps its state there

    def _too_long(signum, frame):
        raise TimeoutError(f"test ran past its hard limit of {TEST_LIMIT}s")

    old = signal.signal(signal.SIGALRM, _too_long)
    signal.alarm(TEST_LIMIT)
    system = None
    try:
        system = PocSystem(str(tmp_path))
        yield system
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        if system is not None:
            report = system.close()
            leftovers = [f"{p}: {cmdline(p)}" for p in report["left_running"]]
            assert not leftovers, f"processes still running: {leftovers}"


def wait_until(what: str, check, timeout: float, poll: float = 0.5):
    """Poll ``check()`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        time.sleep(poll)


def next_round(checkpoint: str) -> int:
    """The checkpoint's next round (0 while there is none, or while it is being replaced)."""
    try:
        return load_resume_state(checkpoint).next_round if os.path.isfile(checkpoint) else 0
    except Exception:
        return 0


def job_status(session, job_id: str) -> str:
    return session.get_job_meta(job_id).get("status") or ""


def train_tasks(log: str) -> int:
    if not os.path.isfile(log):
        return 0
    with open(log, errors="replace") as f:
        return f.read().count(TASK_LINE)


def final_status(session, job_id: str, timeout: float) -> str:
    def finished() -> str:
        status = job_status(session, job_id)
        return status if status.startswith("FINISHED") else ""

    return wait_until(f"job {job_id} to finish", finished, timeout, poll=2.0)


def download(session, job_id: str) -> str:
    return os.path.join(session.download_job_result(job_id), "workspace")


def check_model(run_dir: str) -> None:
    """The final global model loads into the network and is finite."""
    model = load_checkpoint_into_model(os.path.join(run_dir, "app_server", "FL_global_model.pt"))
    for name, value in model.state_dict().items():
        assert torch.isfinite(value.float()).all(), f"non-finite values in {name}"


def test_server_crash_then_resume_from_the_checkpoint(poc):
    num_rounds, crash_after = 4, 2  # the server dies once rounds 0 and 1 are done
    poc.start_all()
    session = poc.session()
    job = poc.stage("jobs", num_rounds=num_rounds, min_clients=len(SITES))
    job_id = session.submit_job(job)
    poc.mark(f"submitted {job_id}")
    checkpoint = os.path.join(poc.server_run_dir(job_id), "app_server", RESUME_FILE)
    wait_until("the resume checkpoint after round 1", lambda: next_round(checkpoint) >= crash_after, 300, 0.2)
    poc.mark(f"checkpoint at next round {next_round(checkpoint)}")
    poc.tracker.refresh()
    old_workers = [p for p in poc.tracker.alive() if job_id in cmdline(p) and "app.client.worker_process" in cmdline(p)]

    poc.kill(poc.server)
    state = load_resume_state(checkpoint)
    assert crash_after <= state.next_round < num_rounds, state.next_round  # killed before the job's end
    assert len(old_workers) == len(SITES), old_workers  # the sites' processes of the job were running

    poc.start(poc.server, restart=True)
    session = poc.session()
    wait_for_clients(session, SITES, timeout=120)  # the sites reconnect by themselves: nothing to restart there
    poc.mark("server restarted, sites reconnected")
    # the new server tells the sites to abort what is left of the dead job
    wait_until("the sites' processes of the dead job to exit",
               lambda: not [p for p in old_workers if p in poc.tracker.alive()], 120, 1.0)
    poc.mark("the sites' processes of the dead job exited")
    # FLARE 2.9: the dead job stays RUNNING in the job store (nothing marks it finished), and its server run folder
    # with the resume checkpoint survives the restart
    assert job_status(session, job_id) == "RUNNING"
    assert os.path.isfile(checkpoint)

    out = subprocess.run([sys.executable, os.path.join(REPO, "deploy", "resume_job.py"),
                          os.path.join(REPO, "jobs", "fedavg"), checkpoint, os.path.join(poc.root, "resumed"),
                          "--executor-arg", "synthetic=" + json.dumps(TINY["synthetic"])],
                         capture_output=True, text=True, timeout=120, env=poc.env)
    assert out.returncode == 0, out.stderr
    resumed = out.stdout.strip().splitlines()[-1]
    resumed_id = session.submit_job(resumed)
    poc.mark(f"submitted the resumed job {resumed_id}")
    assert final_status(session, resumed_id, 300) == "FINISHED:COMPLETED"
    poc.mark("resumed job finished")

    run_dir = download(session, resumed_id)
    resumed_from = grep_logs([run_dir], "resumed from")
    assert resumed_from and f"continuing with round {state.next_round} of {num_rounds}" in resumed_from[0]
    for site in SITES:  # the resumed job ran the remaining rounds only
        assert train_tasks(poc.site_job_log(site, resumed_id)) == num_rounds - state.next_round, site
    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    assert [r["round"] for r in summary["rounds"]] == list(range(num_rounds))
    for entry in summary["rounds"]:
        assert sorted(entry["sites"]) == SITES
    check_model(run_dir)
    initial = summary["rounds"][0]["fairness"]["mean"]
    final = summary["cross_site"]["global"]["mean"]
    assert math.isfinite(final) and 0.0 < final <= 1.0
    assert final > initial, f"final Dice {final} is not above the initial model's {initial}"
    errors = error_lines([run_dir] + [os.path.join(poc.kit(s), resumed_id) for s in SITES])
    assert not errors, errors[:5]
    poc.mark(f"checked: rounds 0-{num_rounds - 1}, Dice {initial:.3f} -> {final:.3f}")


def test_a_site_killed_mid_round_leaves_the_others_to_finish(poc):
    num_rounds, dead = 3, "site-3"
    poc.set_server_resource("heart_beat_timeout", 40)  # see the module docstring
    poc.start_all()
    session = poc.session()
    job = poc.stage("jobs", num_rounds=num_rounds, min_clients=2)
    config_path = os.path.join(job, "app", "config", "config_fed_server.json")
    with open(config_path) as f:
        config = json.load(f)
    for workflow in config["workflows"]:
        if workflow["id"] == "scatter_and_gather":
            workflow["args"]["wait_time_after_min_received"] = 10
        elif workflow["id"] == "cross_site_validate":
            workflow["args"]["validation_timeout"] = 60
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    job_id = session.submit_job(job)
    poc.mark(f"submitted {job_id}")

    # kill the site as soon as it has received the train task of round 1
    checkpoint = os.path.join(poc.server_run_dir(job_id), "app_server", RESUME_FILE)
    wait_until(f"{dead} to receive the task of round 1",
               lambda: train_tasks(poc.site_job_log(dead, job_id)) >= 2, 300, 0.2)
    poc.kill(dead)
    assert next_round(checkpoint) == 1, "the kill did not land in round 1"

    assert final_status(session, job_id, 300) == "FINISHED:COMPLETED"
    poc.mark("job finished")
    run_dir = download(session, job_id)
    with open(os.path.join(run_dir, "metrics", "metrics_summary.json")) as f:
        summary = json.load(f)
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(num_rounds))
    alive = [s for s in SITES if s != dead]
    assert sorted(rounds[0]["sites"]) == SITES
    for entry in rounds[1:]:  # the rounds after the kill were averaged over the two others
        assert sorted(entry["sites"]) == alive, entry["round"]
        assert sorted(entry["aggregation_weights"]) == alive, entry["round"]
    dropped = sorted(set(rounds[0]["sites"]) - set(rounds[-1]["sites"]))
    assert dropped == [dead]
    matrix = summary["cross_site"]["matrix"]
    assert sorted(matrix["global"]) == alive
    check_model(run_dir)
    assert 0.0 < summary["cross_site"]["global"]["mean"] <= 1.0
    # the server gave up on the site (heartbeat) while the job ran, so its status did not wait for it
    assert grep_logs([poc.kit(poc.server)], f"Remove the dead Client. Name: {dead}")
    assert not [ln for ln in grep_logs([poc.kit(poc.server)], "Failing job") if job_id in ln]
    poc.mark(f"checked: {dead} dropped out in round 1, rounds 1-{num_rounds - 1} with {alive}")
