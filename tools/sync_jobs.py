#!/usr/bin/env python3
"""Copy the single source of the code, ``custom/medflare``, into every job's ``app*/custom/medflare``.

FLARE ships a job's ``app/custom`` folder with the job (simulator, POC and production alike), and its zip drops
directory symlinks, so each job needs a real copy. Those copies are generated (git-ignored): edit
``custom/medflare`` only, then run this script (the README's setup runs it).

    python tools/sync_jobs.py           # write the copies
    python tools/sync_jobs.py --check   # exit 1, listing differences, if any job would ship other code
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "medflare"
SOURCE = os.path.join(ROOT, "custom", PACKAGE)
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def job_apps(jobs_dir: str = os.path.join(ROOT, "jobs")) -> List[str]:
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


def sync(app_dir: str) -> None:
    target = os.path.join(app_dir, "custom", PACKAGE)
    if os.path.lexists(target):
        shutil.rmtree(target) if not os.path.islink(target) else os.remove(target)
    shutil.copytree(SOURCE, target, ignore=IGNORE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report jobs whose shipped code differs")
    args = parser.parse_args()
    stale = {}
    for app in job_apps():
        if args.check:
            diffs = differences(app)
            if diffs:
                stale[os.path.relpath(app, ROOT)] = diffs
        else:
            sync(app)
            print(f"synced custom/{PACKAGE} -> {os.path.relpath(app, ROOT)}/custom/{PACKAGE}")
    for app, diffs in stale.items():
        print(f"{app}: shipped code differs from custom/{PACKAGE} (run python tools/sync_jobs.py):")
        for d in diffs[:20]:
            print(f"  {d}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
