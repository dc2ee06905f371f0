"""Helpers for tests that run real FLARE systems (POC, provisioned) on loopback.

Every process a test starts is recorded by id (``deploy/processes.py``) and stopped by id at the end; FLARE's CLI
state and the sites' ``HOME`` live in the test's temp folder, never in the user's ``~/.nvflare``.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _sub in ("deploy", "site_configs", "poc"):
    if os.path.join(REPO, _sub) not in sys.path:
        sys.path.insert(0, os.path.join(REPO, _sub))

from processes import ProcessTracker  # noqa: E402

ERROR_LINE = re.compile(r" - (ERROR|CRITICAL) - ")


def isolated_env(tmp: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for FLARE commands and services: ``HOME`` inside ``tmp``, this venv's Python first on
    ``PATH``, no ``PYTHONPATH`` (jobs run on shipped or site-installed code only), the test's data cache."""
    env = dict(os.environ)
    env["HOME"] = os.path.join(tmp, "home")
    os.makedirs(env["HOME"], exist_ok=True)
    env["NVFLARE_POC_WORKSPACE"] = os.path.join(tmp, "poc")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    env.pop("MEDFLARE_SITE_CONFIG", None)
    env.update(extra or {})
    return env


def start_kit(kit: str, env: Dict[str, str], tracker: ProcessTracker, timeout: float = 60.0) -> None:
    """Start a provisioned server or client from its startup kit with ``startup/start.sh`` (what a site admin
    runs), and record the ids of the restart loop and the FLARE process it starts."""
    out = open(os.path.join(kit, "start_console.log"), "a")
    proc = subprocess.Popen(["bash", os.path.join(kit, "startup", "start.sh")], cwd=kit, env=env,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    tracker.add(proc.pid, f"start.sh of {os.path.basename(kit)}")
    deadline = time.monotonic() + timeout
    pid_files = [os.path.join(kit, "daemon_pid.fl"), os.path.join(kit, "pid.fl")]
    try:
        while not all(os.path.isfile(p) for p in pid_files):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kit} did not start within {timeout:.0f}s (see {out.name})")
            time.sleep(0.5)
    finally:
        proc.wait(timeout=30)  # start.sh only backgrounds sub_start.sh
        out.close()
        tracker.add_pid_files([kit])
        tracker.refresh()


def wait_for_clients(session, clients: Iterable[str], timeout: float = 90.0) -> None:
    """Block until every named client is connected to the server (admin API ``get_system_info``)."""
    wanted = set(clients)
    deadline = time.monotonic() + timeout
    seen: set = set()
    while time.monotonic() < deadline:
        info = session.get_system_info()
        seen = {c.name for c in info.client_info}
        if wanted <= seen:
            return
        time.sleep(1.0)
    raise TimeoutError(f"clients {sorted(wanted - seen)} did not connect within {timeout:.0f}s")


def error_lines(roots: Iterable[str], pattern: str = "log.txt") -> List[str]:
    """ERROR/CRITICAL lines of every ``log.txt`` under ``roots``."""
    lines = []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", pattern), recursive=True)):
            with open(path, errors="replace") as f:
                lines += [f"{path}: {ln.rstrip()}" for ln in f if ERROR_LINE.search(ln)]
    return lines


def grep_logs(roots: Iterable[str], text: str) -> List[str]:
    hits = []
    for root in roots:
        for path in sorted(glob.glob(os.path.join(root, "**", "log.txt"), recursive=True)):
            with open(path, errors="replace") as f:
                hits += [f"{path}: {ln.rstrip()}" for ln in f if text in ln]
    return hits


def stop_all(tracker: ProcessTracker, grace: float = 30.0) -> Dict[str, List[int]]:
    """Stop everything the test started, by id; returns which ids needed signals and which survived."""
    report = tracker.stop(grace=grace)
    report["left_running"] = tracker.alive()
    return report


def restart_kit(kit: str, env: Dict[str, str], tracker: ProcessTracker, timeout: float = 60.0) -> None:
    """Start a participant again after its processes died (a crash): remove the pid files the dead processes left
    (``start_kit`` waits for fresh ones), then :func:`start_kit`."""
    for name in ("daemon_pid.fl", "pid.fl"):
        path = os.path.join(kit, name)
        if os.path.isfile(path):
            os.remove(path)
    start_kit(kit, env, tracker, timeout)


def kill_participant(tracker: ProcessTracker) -> List[int]:
    """Crash a participant: SIGKILL every live process of ``tracker`` (its restart loop, the server or client, and
    its job processes, found by :meth:`ProcessTracker.refresh`); returns the ids killed."""
    import signal

    tracker.refresh()
    killed = tracker.signal_all(signal.SIGKILL)
    left = tracker.wait_gone(15.0)
    if left:
        raise RuntimeError(f"processes {left} survived SIGKILL")
    return killed
