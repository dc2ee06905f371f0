"""Write a job with changed settings from the spec, and run it in the FLARE simulator (used by tests and
benchmarks)."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Dict, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "custom"))

from jobspec import get_job, write_job  # noqa: E402

NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")


def copy_job(name: str, dest: str, num_rounds: Optional[int] = None,
             client_args: Optional[Dict[str, Any]] = None, server_args: Optional[Dict[str, Any]] = None,
             aggregator_args: Optional[Dict[str, Any]] = None, seed: Optional[int] = None,
             n_sites: Optional[int] = None) -> str:
    """Write the job ``name`` of ``JOBS`` (``tools/jobspec.py``), changed, to ``dest/<name>`` with a fresh copy of
    ``custom/medflare``; returns the job folder. Its ``deploy_map`` targets ``@ALL`` sites, so it runs with any
    ``-n``.

    Args:
        name: job name (a folder under ``jobs/``).
        dest: folder to write into.
        num_rounds: rounds of training.
        client_args: merged into the executor's args (nested dicts such as ``synthetic`` are merged too).
        server_args: ``{"min_clients": n}`` (the same as ``n_sites``).
        aggregator_args: merged into the aggregator's args.
        seed: seed of the initial model and of the sites (default: the job's).
        n_sites: sites every round waits for (default: the job's).
    """
    extra = sorted(set(server_args or {}) - {"min_clients"})
    if extra:
        raise ValueError(f"server_args can only set min_clients, got {extra}")
    n_sites = (server_args or {}).get("min_clients", n_sites)
    changes = {k: v for k, v in (("num_rounds", num_rounds), ("seed", seed), ("n_sites", n_sites)) if v is not None}
    spec = get_job(name).with_changes(executor_args=client_args, aggregator_args=aggregator_args,
                                      **changes)
    return write_job(spec, dest)


def run_simulator(job: str, workspace: str, n_clients: int = 3, threads: Optional[int] = None,
                  env: Optional[Dict[str, str]] = None, timeout: int = 3600) -> subprocess.CompletedProcess:
    """``nvflare simulator JOB -w WS -n N -t T`` in a subprocess; its output goes to ``WS.out``."""
    cmd = [NVFLARE, "simulator", job, "-w", workspace, "-n", str(n_clients), "-t", str(threads or n_clients)]
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)  # the job must run on the code it ships
    with open(workspace + ".out", "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env, timeout=timeout, cwd=ROOT)
