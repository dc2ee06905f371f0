"""Provisioned production rehearsed on loopback: ``deploy/project.yml`` provisioned with the server named localhost
(mutual TLS as provisioned), the server and two hospitals started from their startup kits, jobs submitted through
the admin API by people with different roles.

One federation serves all tests of this module (about 2.5 minutes in all on 2 CPU cores). Each test first installs
the site configs it needs (``site_configs/install_site.py``); site changes of the allow-list and of installed code
take effect for the next job without a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from flare_processes import REPO, error_lines, grep_logs, isolated_env, start_kit, stop_all, wait_for_clients
from flare_runs import check_run
from install_site import install
from local_project import server_ports, write_local_project
from processes import ProcessTracker
from stage_job import stage_job

pytestmark = pytest.mark.slow

SITES = ["hospital-a", "hospital-b"]
MODALITIES = {"hospital-a": "t1", "hospital-b": "t2"}
ADMIN = "admin@coordinator.example.org"  # project_admin
LEAD = "researcher@hospital-a.example.org"  # lead: may submit, may not ship code (not in byoc_roles below)
ORG_ADMIN = "it@hospital-a.example.org"  # org_admin: may not submit
NUM_ROUNDS = 2
TINY = {"synthetic": {"n_train": 32, "n_val": 8}}
JOB_TIMEOUT = 420


class Federation:
    def __init__(self, root: str) -> None:
        self.root = root
        self.env = isolated_env(root)
        self.tracker = ProcessTracker()
        self.sessions = {}
        self.prod = ""
        self.port = 0

    def kit(self, name: str) -> str:
        return os.path.join(self.prod, name)

    def install(self, name: str, **values) -> None:
        """(Re)install a participant's site config: the sites grant the project admin, explicitly, the right to ship
        code; project admin and leads may submit; everything else keeps the secure defaults (no training curves or
        local models leave the sites)."""
        base = {"byoc_roles": ["project_admin"], "submit_roles": ["project_admin", "lead"]}
        if name == "localhost":
            base.update(job_storage=os.path.join(self.root, "server_store", "jobs"),
                        snapshot_storage=os.path.join(self.root, "server_store", "snapshots"))
        else:
            base["synthetic_modality"] = MODALITIES[name]
        install(self.kit(name), {**base, **values}, source=f"test values for {name}")

    def install_all(self, **values) -> None:
        for name in ["localhost"] + SITES:
            self.install(name, **values)

    def session(self, user: str):
        if user not in self.sessions:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            self.sessions[user] = new_secure_session(user, self.kit(user), timeout=60)
        return self.sessions[user]

    def stage(self, name: str, code: str) -> str:
        return stage_job(os.path.join(REPO, "jobs", "fedavg"), os.path.join(self.root, "jobs"), code=code, name=name,
                         num_rounds=NUM_ROUNDS, min_clients=len(SITES), executor_args=TINY)

    def run_job(self, user: str, job: str) -> tuple:
        s = self.session(user)
        job_id = s.submit_job(job)
        meta = s.wait_for_job(job_id, timeout=JOB_TIMEOUT)
        return job_id, meta

    def site_job_logs(self, job_id: str) -> list:
        return [os.path.join(self.kit(s), job_id) for s in SITES]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    fed = Federation(str(tmp_path_factory.mktemp("prov")))
    # the synthetic data cache of the test session (as tests/conftest.py sets it for function-scoped tests)
    fed.env["MEDFLARE_CACHE_DIR"] = (os.environ.get("MEDFLARE_TEST_CACHE")
                                     or str(tmp_path_factory.getbasetemp() / "medflare-cache"))
    t0 = time.monotonic()
    project = write_local_project(os.path.join(REPO, "deploy", "project.yml"), os.path.join(fed.root, "project.yml"),
                                  clients=SITES)
    fed.port = server_ports(project)["fed_learn_port"]
    nvflare = os.path.join(os.path.dirname(sys.executable), "nvflare")
    subprocess.run([nvflare, "provision", "-p", os.path.join(fed.root, "project.yml"), "-w",
                    os.path.join(fed.root, "provision")], env=fed.env, check=True, timeout=120,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    fed.prod = os.path.join(fed.root, "provision", project["name"], "prod_00")
    fed.install_all()
    old_home = os.environ.get("HOME")
    os.environ["HOME"] = fed.env["HOME"]  # the admin API in this process keeps its state in the test's HOME
    try:
        for name in ["localhost"] + SITES:
            start_kit(fed.kit(name), fed.env, fed.tracker)
        wait_for_clients(fed.session(ADMIN), SITES)
        print(f"federation up in {time.monotonic() - t0:.1f}s on port {fed.port}")
        yield fed
    finally:
        try:
            for user, s in list(fed.sessions.items()):
                if user != ADMIN:
                    s.close()
            if ADMIN in fed.sessions:
                try:
                    fed.sessions[ADMIN].shutdown_system()
                except Exception as e:  # the processes are stopped by id below anyway
                    print(f"shutdown_system: {e}")
                fed.sessions[ADMIN].close()
        finally:
            report = stop_all(fed.tracker)
            if old_home is None:
                os.environ.pop("HOME", None)
            else:
                os.environ["HOME"] = old_home
            print(f"stopped: {report}; federation lived {time.monotonic() - t0:.1f}s")
            assert not report["left_running"], f"processes still running: {report['left_running']}"


def test_kits_are_localhost_mutual_tls(federation):
    with open(os.path.join(federation.kit("hospital-a"), "startup", "fed_client.json")) as f:
        client = json.load(f)
    assert client["client"]["connection_security"] == "mtls"
    assert client["servers"][0]["service"]["target"] == f"localhost:{federation.port}"
    for cert in ("client.crt", "client.key", "rootCA.pem"):
        assert os.path.isfile(os.path.join(federation.kit("hospital-a"), "startup", cert))
    with open(os.path.join(federation.kit("localhost"), "startup", "fed_server.json")) as f:
        server = json.load(f)["servers"][0]
    assert server["connection_security"] == "mtls"
    listening = _listening_addresses(federation.port)
    assert listening and all(addr.startswith("127.") for addr in listening), listening


def test_project_admin_runs_job_with_shipped_code(federation, tmp_path):
    federation.install_all(install_code=False)
    job = federation.stage("fedavg_shipped", code="shipped")
    job_id, meta = federation.run_job(ADMIN, job)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert meta.get("byoc") is True
    result = federation.session(ADMIN).download_job_result(job_id, str(tmp_path))
    run_dir = os.path.join(result, "workspace")
    check_run(run_dir, SITES, NUM_ROUNDS, local_models=False, site_curves=False)  # the production defaults
    errors = error_lines([run_dir] + federation.site_job_logs(job_id))
    assert not errors, "\n".join(errors[:10])


def test_role_without_submit_right_is_refused(federation):
    from nvflare.fuel.flare_api.api_spec import AuthorizationError

    job = federation.stage("fedavg_org_admin", code="shipped")
    with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
        federation.session(ORG_ADMIN).submit_job(job)


def test_shipped_code_is_refused_for_role_without_byoc_right(federation):
    federation.install_all(install_code=False)
    job = federation.stage("fedavg_lead_shipped", code="shipped")
    job_id, meta = federation.run_job(LEAD, job)
    assert meta["status"] == "FINISHED:FAILED_TO_RUN", meta
    assert any("BYOC not permitted" in d for d in meta.get("job_deploy_detail", [])), meta


def test_site_installed_code_runs_job_without_shipped_code(federation, tmp_path):
    federation.install_all(install_code=True)  # allowed_classes keeps its default ["medflare."]
    job = federation.stage("fedavg_site_code", code="site")
    assert not any(os.path.isdir(os.path.join(job, d, "custom")) for d in os.listdir(job))
    job_id, meta = federation.run_job(LEAD, job)
    assert meta["status"] == "FINISHED:COMPLETED", meta
    assert not meta.get("byoc"), meta
    result = federation.session(LEAD).download_job_result(job_id, str(tmp_path))
    run_dir = os.path.join(result, "workspace")
    check_run(run_dir, SITES, NUM_ROUNDS, local_models=False, site_curves=False)
    errors = error_lines([run_dir] + federation.site_job_logs(job_id))
    assert not errors, "\n".join(errors[:10])


def test_site_allow_list_refuses_job_without_shipped_code(federation):
    federation.install_all(install_code=True)
    federation.install("hospital-b", install_code=True, allowed_classes=[])
    try:
        job = federation.stage("fedavg_refused", code="site")
        job_id, meta = federation.run_job(LEAD, job)
        assert meta["status"] != "FINISHED:COMPLETED", meta
        refusals = grep_logs(federation.site_job_logs(job_id), "is not in allow_list")
        assert any("hospital-b" in r and "'medflare.flare.executors.SegmentationExecutor'" in r for r in refusals), refusals
        assert not grep_logs([os.path.join(federation.kit("hospital-a"), job_id)], "is not in allow_list")
    finally:
        federation.install("hospital-b", install_code=True)


def _listening_addresses(port: int) -> list:
    """Local IPv4 addresses with a socket listening on ``port`` (from /proc/net/tcp)."""
    addrs = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            if state == "0A" and int(port_hex, 16) == port:
                ip = ".".join(str(int(ip_hex[i:i + 2], 16)) for i in (6, 4, 2, 0))
                addrs.append(ip)
    return addrs
