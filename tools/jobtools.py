"""Copy a job folder with changed settings, and run it in the FLARE simulator (used by tests and benchmarks)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any, Dict, Optional

from sync_jobs import ROOT, differences

NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        config = json.load(f)
    edit(config)
    with open(path, "w") as f:
        json.dump(config, f, indent=1)


def _merge(args: Dict[str, Any], changes: Dict[str, Any]) -> None:
    """Set ``changes`` in ``args``; a dict value is merged into an existing dict (one level deep)."""
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(args.get(key), dict):
            args[key] = {**args[key], **value}
        else:
            args[key] = value


def copy_job(name: str, dest: str, num_rounds: Optional[int] = None,
             client_args: Optional[Dict[str, Any]] = None, server_args: Optional[Dict[str, Any]] = None,
             component_args: Optional[Dict[str, Dict[str, Any]]] = None) -> str:
    """Copy ``jobs/<name>`` (whose shipped code must match ``custom/medflare``) to ``dest/<name>`` and change it.

    Args:
        name: job folder name under ``jobs/``.
        dest: folder to copy into.
        num_rounds: rounds of training (server config).
        client_args: merged into the executor's args (nested dicts such as ``synthetic`` are merged too).
        server_args: top-level keys of the server config (e.g. ``min_clients``).
        component_args: ``{component id: args}`` merged into server components (e.g. the persistor's ``seed``;
            nested dicts such as the persistor's ``model`` are merged too).
    """
    src = os.path.join(ROOT, "jobs", name)
    diffs = differences(os.path.join(src, "app"))
    if diffs:
        raise RuntimeError(f"jobs/{name} would ship stale code ({diffs[:3]}); run python tools/sync_jobs.py")
    job = os.path.join(dest, name)
    shutil.copytree(src, job, ignore=shutil.ignore_patterns("__pycache__"))
    config_dir = os.path.join(job, "app", "config")

    def edit_server(config: Dict[str, Any]) -> None:
        if num_rounds is not None:
            config["num_rounds"] = num_rounds
        config.update(server_args or {})
        for component in config.get("components", []):
            _merge(component.setdefault("args", {}), (component_args or {}).get(component["id"], {}))

    def edit_client(config: Dict[str, Any]) -> None:
        _merge(config["executors"][0]["executor"].setdefault("args", {}), client_args or {})

    _edit_json(os.path.join(config_dir, "config_fed_server.json"), edit_server)
    _edit_json(os.path.join(config_dir, "config_fed_client.json"), edit_client)
    return job


def run_simulator(job: str, workspace: str, n_clients: int = 3, threads: Optional[int] = None,
                  env: Optional[Dict[str, str]] = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    """``nvflare simulator JOB -w WS -n N -t T`` in a subprocess; its output goes to ``WS.out``."""
    cmd = [NVFLARE, "simulator", job, "-w", workspace, "-n", str(n_clients), "-t", str(threads or n_clients)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)  # the job must run on the code it ships
    with open(workspace + ".out", "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, timeout=timeout, cwd=ROOT)
