#!/usr/bin/env python3
"""Stage a job folder of ``jobs/`` for submission to a running FLARE system (POC or production).

The staged copy is what ``nvflare job submit -j`` uploads. Two ways to get the code to the sites:

* ``--code shipped`` (default): every app gets a fresh ``custom/medflare`` copied from ``custom/medflare``. The job
  is "bring your own code" (BYOC): the submitter's role needs the ``byoc`` right at every site.
* ``--code site``: no ``custom/`` folder at all. The sites (and the server) must have medflare installed (e.g. with
  ``site_configs/install_site.py --set install_code=true``) and must admit ``medflare.`` in their class allow-list.

Cross-site evaluation of the sites' *local* models (each site's un-averaged model sent to every other site) is
switched off in the staged job unless ``--cross-site-local-models`` is given: the staged job's
``CrossSiteModelEval`` gets ``submit_model_task_name: ""``, so only the global models are evaluated at every site.
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
CODE_SOURCE = os.path.join(ROOT, "custom", "medflare")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class StageError(ValueError):
    """The job folder or the overrides are not acceptable."""


def _load(path: str) -> Dict[str, Any]:
    with open(path) as f:
        return json.load(f)


def _dump(data: Dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


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
    """Copy ``job`` to ``out_dir/<name>`` and apply the code mode and overrides; returns the staged folder.

    Args:
        job: a job folder (``meta.json`` + app folders).
        out_dir: where to put the staged job (created).
        code: ``"shipped"`` (copy ``custom/medflare`` into each app) or ``"site"`` (no ``custom/`` folder).
        name: job name (folder and ``meta.json`` name); default: the source folder's name.
        num_rounds: sets the server config's top-level ``num_rounds``.
        min_clients: sets ``min_clients`` in ``meta.json`` and the server config's top-level ``min_clients``.
        server_args: other top-level keys of ``config_fed_server.json`` to set.
        executor_args: arguments merged into the (first) executor's ``args`` in ``config_fed_client.json``.
        cross_site_local_models: keep the job's cross-site evaluation of the sites' local models (default: switch
            it off, see the module docstring).
    """
    if code not in ("shipped", "site"):
        raise StageError(f"code must be 'shipped' or 'site', got {code!r}")
    job = os.path.abspath(job)
    if not os.path.isfile(os.path.join(job, "meta.json")):
        raise StageError(f"{job} is not a job folder (no meta.json)")
    name = name or os.path.basename(job.rstrip(os.sep))
    dest = os.path.join(os.path.abspath(out_dir), name)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    shutil.copytree(job, dest, ignore=IGNORE)
    apps = app_dirs(dest)
    if not apps:
        raise StageError(f"{job} has no app folder with a config/ folder")
    for app in apps:
        custom = os.path.join(app, "custom")
        if os.path.lexists(custom):
            shutil.rmtree(custom) if not os.path.islink(custom) else os.remove(custom)
        if code == "shipped":
            shutil.copytree(CODE_SOURCE, os.path.join(custom, "medflare"), ignore=IGNORE)

    meta_path = os.path.join(dest, "meta.json")
    meta = _load(meta_path)
    meta["name"] = name
    if min_clients is not None:
        meta["min_clients"] = min_clients
    _dump(meta, meta_path)

    server_overrides = dict(server_args or {})
    if num_rounds is not None:
        server_overrides["num_rounds"] = num_rounds
    if min_clients is not None:
        server_overrides["min_clients"] = min_clients
    for app in apps:
        server_cfg = os.path.join(app, "config", "config_fed_server.json")
        if os.path.isfile(server_cfg):
            cfg = _load(server_cfg)
            if "min_clients" in server_overrides and "min_clients" not in cfg:
                server_overrides.pop("min_clients")
            cfg.update(server_overrides)
            if not cross_site_local_models:
                set_cross_site_local_models(cfg, False)
            _dump(cfg, server_cfg)
        client_cfg = os.path.join(app, "config", "config_fed_client.json")
        if executor_args and os.path.isfile(client_cfg):
            cfg = _load(client_cfg)
            try:
                cfg["executors"][0]["executor"].setdefault("args", {}).update(executor_args)
            except (KeyError, IndexError) as e:
                raise StageError(f"{client_cfg} has no executor to set arguments on") from e
            _dump(cfg, client_cfg)
    return dest


def set_cross_site_local_models(server_config: Dict[str, Any], enabled: bool) -> int:
    """Switch the evaluation of local models of every ``CrossSiteModelEval`` workflow on or off (in place); returns
    how many workflows were changed."""
    changed = 0
    for workflow in server_config.get("workflows") or []:
        if str(workflow.get("path", "")).endswith(".CrossSiteModelEval"):
            args = workflow.setdefault("args", {})
            if enabled:
                args.pop("submit_model_task_name", None)
            else:
                args["submit_model_task_name"] = ""
            changed += 1
    return changed


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
                        help="top-level key of config_fed_server.json (repeatable)")
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
