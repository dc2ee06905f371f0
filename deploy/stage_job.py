#!/usr/bin/env python3
"""Stage a job folder of ``jobs/`` for submission to a running FLARE system (POC or production).

The staged job is written from the job's spec (``tools/jobspec.py``) with the changes asked for; it is what
``nvflare job submit -j`` uploads. Its ``deploy_map`` targets ``@ALL`` sites (the system's sites have their own
names), and the folder given must equal what the spec generates (``python tools/sync_jobs.py --check``), so the
staged job is the job the folder shows. Two ways to get the code to the sites:

* ``--code shipped`` (default): every app gets a fresh ``custom/medflare`` copied from ``custom/medflare``. The job
  is "bring your own code" (BYOC): the submitter's role needs the ``byoc`` right at every site.
* ``--code site``: no ``custom/`` folder at all. The sites (and the server) must have medflare installed (e.g. with
  ``site_configs/install_site.py --set install_code=true``) and must admit ``medflare.`` in their class allow-list.

Cross-site evaluation of the sites' *local* models (each site's un-averaged model sent to every other site) is
switched off in the staged job unless ``--cross-site-local-models`` is given: the staged job's cross-site
evaluation (``CrossSiteEvaluation``, FLARE's ``CrossSiteModelEval``) gets ``submit_model_task_name: ""``, so only the
global models are evaluated at every site.
(Sites refuse to send their local model anyway unless their ``share_local_model`` value allows it.)

Smaller runs for rehearsals and tests::

    python deploy/stage_job.py jobs/fedavg /tmp/staged --num-rounds 2 --min-clients 2 \\
        --executor-arg 'synthetic={"n_train": 32, "n_val": 8}'

prints the staged folder (``/tmp/staged/fedavg``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "custom"), os.path.join(ROOT, "tools")]

from jobspec import folder_differences, get_job, write_job  # noqa: E402

SERVER_SETTINGS = ("num_rounds", "min_clients", "server")


class StageError(ValueError):
    """The job folder or the overrides are not acceptable."""


def app_dirs(job_dir: str) -> List[str]:
    """App folders (those with a ``config/`` folder) of a job."""
    return sorted(os.path.join(job_dir, d) for d in os.listdir(job_dir)
                  if os.path.isdir(os.path.join(job_dir, d, "config")))


def parse_json_assignment(text: str) -> tuple:
    if "=" not in text:
        raise StageError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw


def stage_job(job: str, out_dir: str, code: str = "shipped", name: Optional[str] = None,
              num_rounds: Optional[int] = None, min_clients: Optional[int] = None,
              server_args: Optional[Dict[str, Any]] = None, executor_args: Optional[Dict[str, Any]] = None,
              cross_site_local_models: bool = False) -> str:
    """Write ``job``, changed, to ``out_dir/<name>`` from its spec; returns the staged folder.

    Args:
        job: a job folder of ``jobs/`` (its name selects the spec; its configs must equal the spec's).
        out_dir: where to put the staged job (created).
        code: ``"shipped"`` (copy ``custom/medflare`` into each app) or ``"site"`` (no ``custom/`` folder).
        name: job name (folder and ``meta.json`` name); default: the source folder's name.
        num_rounds: rounds of training.
        min_clients: sites every round waits for (``min_clients`` of ``meta.json`` and the server config).
        server_args: the same as keys of ``config_fed_server.json``: ``num_rounds``, ``min_clients``, ``server``.
        executor_args: merged into the executor's arguments (see ``merge_args`` in ``tools/jobspec.py``).
        cross_site_local_models: keep the job's cross-site evaluation of the sites' local models (default: switch
            it off, see the module docstring).
    """
    if code not in ("shipped", "site"):
        raise StageError(f"code must be 'shipped' or 'site', got {code!r}")
    job = os.path.abspath(job)
    if not os.path.isfile(os.path.join(job, "meta.json")):
        raise StageError(f"{job} is not a job folder (no meta.json)")
    try:
        spec = get_job(os.path.basename(job.rstrip(os.sep)))
    except ValueError as e:
        raise StageError(str(e)) from e
    diffs = folder_differences(spec, job)
    if diffs:
        raise StageError(f"{job} differs from its spec ({diffs}); edit tools/jobspec.py and run "
                         "python tools/sync_jobs.py")
    settings = dict(server_args or {})
    unknown = sorted(set(settings) - set(SERVER_SETTINGS))
    if unknown:
        raise StageError(f"server settings {unknown} cannot be changed; these can: {list(SERVER_SETTINGS)}")
    changes: Dict[str, Any] = {"name": name or spec.name,
                               "cross_site_local_models": cross_site_local_models}
    for key, value in (("num_rounds", settings.get("num_rounds", num_rounds)),
                       ("n_sites", settings.get("min_clients", min_clients)), ("server", settings.get("server"))):
        if value is not None:
            changes[key] = value
    staged = spec.with_changes(executor_args=executor_args, **changes)
    dest = os.path.join(os.path.abspath(out_dir), staged.name)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    return write_job(staged, out_dir, code=code == "shipped")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", help="job folder, e.g. jobs/fedavg")
    parser.add_argument("out_dir", help="folder to stage the job in (the job lands in OUT_DIR/<name>)")
    parser.add_argument("--code", choices=["shipped", "site"], default="shipped",
                        help="ship custom/medflare with the job (BYOC) or rely on site-installed code")
    parser.add_argument("--name", help="job name (default: the job folder's name)")
    parser.add_argument("--num-rounds", type=int)
    parser.add_argument("--min-clients", type=int)
    parser.add_argument("--server-arg", action="append", default=[], metavar="KEY=JSON",
                        help="num_rounds, min_clients or server of config_fed_server.json (repeatable)")
    parser.add_argument("--executor-arg", action="append", default=[], metavar="KEY=JSON",
                        help="executor argument in config_fed_client.json (repeatable)")
    parser.add_argument("--cross-site-local-models", action="store_true",
                        help="keep the cross-site evaluation of the sites' local models (default: global models only)")
    args = parser.parse_args(argv)
    try:
        dest = stage_job(args.job, args.out_dir, code=args.code, name=args.name, num_rounds=args.num_rounds,
                         min_clients=args.min_clients,
                         server_args=dict(parse_json_assignment(a) for a in args.server_arg),
                         executor_args=dict(parse_json_assignment(a) for a in args.executor_arg),
                         cross_site_local_models=args.cross_site_local_models)
    except StageError as e:
        print(f"stage_job: error: {e}", file=sys.stderr)
        return 2
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
