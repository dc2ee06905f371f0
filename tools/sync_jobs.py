#!/usr/bin/env python3
"""Generate the job folders under ``jobs/`` from the spec (``tools/jobspec.py``) and ship the code in each.

A job folder is ``meta.json`` plus ``app/config/*.json``, written from ``JOBS`` in ``tools/jobspec.py`` (committed), and
``app/custom/medflare``, a copy of the single source of the code, ``custom/medflare`` (git-ignored: FLARE ships a
job's ``app/custom`` folder with the job, and its zip drops directory symlinks, so each job needs a real copy).
Edit ``custom/medflare`` and ``tools/jobspec.py`` only, then run this script (the README's setup runs it).

    python tools/sync_jobs.py           # write every job's configs and code
    python tools/sync_jobs.py --check   # exit 1, listing differences, if a job differs from the spec or the code
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "custom"))

from flare_config import PACKAGE  # noqa: E402
from jobspec import JOBS, folder_differences, write_job  # noqa: E402

SOURCE = os.path.join(ROOT, "custom", PACKAGE)
JOBS_DIR = os.path.join(ROOT, "jobs")


def job_apps(jobs_dir: str = JOBS_DIR) -> List[str]:
    """Every app folder (one with a ``config/`` folder) of every job under ``jobs_dir``."""
    apps = []
    for job in sorted(os.listdir(jobs_dir)):
        job_dir = os.path.join(jobs_dir, job)
        if not os.path.isfile(os.path.join(job_dir, "meta.json")):
            continue
        for app in sorted(os.listdir(job_dir)):
            if os.path.isdir(os.path.join(job_dir, app, "config")):
                apps.append(os.path.join(job_dir, app))
    return apps


def _tree_differences(left: str, right: str, rel: str = "") -> List[str]:
    if not os.path.isdir(right):
        return [f"{rel or '.'}: missing"]
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    diffs = [f"{os.path.join(rel, n)}: only in custom/{PACKAGE}" for n in cmp.left_only]
    diffs += [f"{os.path.join(rel, n)}: not in custom/{PACKAGE}" for n in cmp.right_only if not n.endswith(".pyc")]
    _, mismatch, errors = filecmp.cmpfiles(left, right, cmp.common_files, shallow=False)
    diffs += [f"{os.path.join(rel, n)}: differs" for n in mismatch + errors]
    for sub in cmp.common_dirs:
        diffs += _tree_differences(os.path.join(left, sub), os.path.join(right, sub), os.path.join(rel, sub))
    return diffs


def differences(app_dir: str) -> List[str]:
    """What the app would ship that differs from ``custom/medflare`` (empty when in sync)."""
    target = os.path.join(app_dir, "custom", PACKAGE)
    if os.path.islink(target) or os.path.islink(os.path.join(app_dir, "custom")):
        return ["custom is a symlink (FLARE's job zip drops directory symlinks)"]
    return _tree_differences(SOURCE, target)


def config_differences(jobs_dir: str = JOBS_DIR) -> Dict[str, List[str]]:
    """``{job: files}`` whose committed text differs from what the spec generates (jobs missing or not in the spec
    included)."""
    found = {name for name in os.listdir(jobs_dir) if os.path.isfile(os.path.join(jobs_dir, name, "meta.json"))}
    stale = {name: ["not in JOBS of tools/jobspec.py"] for name in sorted(found - set(JOBS))}
    for name, spec in JOBS.items():
        diffs = folder_differences(spec, os.path.join(jobs_dir, name))
        if diffs:
            stale[name] = diffs
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report jobs that differ from the spec or code")
    args = parser.parse_args()
    if not args.check:
        for spec in JOBS.values():
            print(f"wrote {os.path.relpath(write_job(spec, JOBS_DIR), ROOT)} (configs and custom/{PACKAGE})")
        return 0
    stale = config_differences()
    for app in job_apps():
        diffs = differences(app)
        if diffs:
            stale.setdefault(os.path.basename(os.path.dirname(app)), []).extend(f"custom: {d}" for d in diffs)
    for job, diffs in stale.items():
        print(f"jobs/{job} differs from the spec or custom/{PACKAGE} (run python tools/sync_jobs.py):")
        for d in diffs[:20]:
            print(f"  {d}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
