#!/usr/bin/env python3
"""Stage a job that continues an interrupted run from its server's resume checkpoint.

FLARE 2.9 keeps no snapshot of a running job: when the server process dies, the job ends. medflare's controllers
write ``medflare_resume.pt`` into the server's run folder at the end of every round (see
``custom/medflare/flare/resume.py``);
this command stages a copy of the job that starts from it (same staging as ``deploy/stage_job.py``, plus the
controller's ``resume_from``), to be submitted as a new job::

    python deploy/resume_job.py jobs/fedavg <server workspace>/<job id>/app_server/medflare_resume.pt /tmp/resumed
    nvflare job submit -j /tmp/resumed/fedavg

Run it on the server machine (the checkpoint is read there by the server, by its absolute path) and give the same
overrides the interrupted job was staged with (``--num-rounds`` defaults to the rounds the checkpoint planned).
The resumed job continues with the checkpoint's next round, global model, fairness state, relay encoders, server
optimiser state and run summary. It prints the staged folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "custom"))

from stage_job import StageError, app_dirs, parse_json_assignment, stage_job  # noqa: E402

from medflare.flare.resume import ResumeError, load_resume_state  # noqa: E402

RESUMABLE_BASE = "medflare.flare.workflows.MetricsScatterAndGather"
"""The controllers that can resume: this class and its subclasses, under any path that names them (a job staged
before the package's re-layout names ``medflare.workflows.MetricsScatterAndGather``)."""


def resumable(path: Any) -> bool:
    """Whether a workflow's class path names a controller that can resume."""
    if not isinstance(path, str) or "." not in path:
        return False
    module, _, name = path.rpartition(".")
    base_module, _, base_name = RESUMABLE_BASE.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return False
    base = getattr(importlib.import_module(base_module), base_name)
    return isinstance(cls, type) and issubclass(cls, base)


def set_resume_from(job_dir: str, checkpoint: str) -> List[str]:
    """Point every resumable controller of a staged job at ``checkpoint``; returns the server configs changed.

    Raises:
        StageError: the job has no resumable controller.
    """
    changed = []
    for app in app_dirs(job_dir):
        path = os.path.join(app, "config", "config_fed_server.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            config = json.load(f)
        workflows = [w for w in config.get("workflows", []) if resumable(w.get("path"))]
        for workflow in workflows:
            workflow.setdefault("args", {})["resume_from"] = checkpoint
        if workflows:
            with open(path, "w") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
            changed.append(path)
    if not changed:
        raise StageError(f"{job_dir} has no controller that can resume ({RESUMABLE_BASE} or a subclass)")
    return changed


def resume_job(job: str, checkpoint: str, out_dir: str, code: str = "shipped", num_rounds: Optional[int] = None,
               min_clients: Optional[int] = None, executor_args: Optional[Dict[str, Any]] = None) -> str:
    """Stage ``job`` to continue from ``checkpoint``; returns the staged folder.

    Raises:
        ResumeError: the checkpoint is missing, unreadable, or has no round left to run.
        StageError: the job cannot be staged or cannot resume.
    """
    checkpoint = os.path.abspath(checkpoint)
    state = load_resume_state(checkpoint)
    rounds = num_rounds if num_rounds is not None else state.num_rounds
    if state.next_round >= rounds:
        raise ResumeError(f"{checkpoint} is after round {state.next_round - 1}: nothing left of {rounds} rounds")
    staged = stage_job(job, out_dir, code=code, num_rounds=rounds, min_clients=min_clients,
                       executor_args=executor_args)
    set_resume_from(staged, checkpoint)
    return staged


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="the job folder the interrupted run was staged from (e.g. jobs/fedavg)")
    parser.add_argument("checkpoint", help="medflare_resume.pt in the interrupted run's app_server folder")
    parser.add_argument("out_dir", help="where to stage the resumed job")
    parser.add_argument("--code", choices=["shipped", "site"], default="shipped")
    parser.add_argument("--num-rounds", type=int, help="total rounds (default: what the checkpoint planned)")
    parser.add_argument("--min-clients", type=int)
    parser.add_argument("--executor-arg", action="append", default=[], metavar="KEY=JSON")
    args = parser.parse_args(argv)
    executor_args = dict(parse_json_assignment(a) for a in args.executor_arg)
    try:
        print(resume_job(args.job, args.checkpoint, args.out_dir, args.code, args.num_rounds, args.min_clients,
                         executor_args))
        return 0
    except (ResumeError, StageError) as e:
        print(f"resume_job: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
