#!/usr/bin/env python3
"""Run a medflare job on a FLARE POC system (server + sites as separate processes on this machine), end to end.

    python poc/run_poc.py --job jobs/fedavg [--sites site-1 site-2 site-3] [--workspace workspaces/poc]

Steps (each bounded in time; the system is stopped whatever happens after it was started):

1. copy ``poc/project.yml`` with free loopback ports and the chosen sites, ``nvflare poc prepare -i`` it;
2. install the site configs into every participant's ``local/`` (``poc/sites.json`` through
   ``site_configs/install_site.py``; ``poc prepare`` wipes ``local/``);
3. stage the job (``deploy/stage_job.py``: code shipped with the job, or ``--code site`` to install it at the sites);
4. ``nvflare poc start``; ``nvflare job submit``; ``nvflare job wait --timeout``; ``nvflare job download``;
5. ``nvflare poc stop``, then wait for every process the system started (ids from its ``daemon_pid.fl``/``pid.fl``
   files and their children) to exit, terminating by id any that do not.

Results land in ``<workspace>/results/<job_id>/``; ``<workspace>/results/run_summary.json`` says what ran, the job
status, where the models, metrics summary and cross-site matrix are, ERROR lines of the logs, and the stop report.
FLARE's CLI state (``~/.nvflare``) is kept inside the workspace (``HOME=<workspace>/home``); the synthetic data
cache stays where ``MEDFLARE_CACHE_DIR`` (default ``~/.cache/medflare``) points. Exit status 0 only if the job
finished ``FINISHED:COMPLETED`` and its results were downloaded.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "deploy"))
sys.path.insert(0, os.path.join(ROOT, "site_configs"))

from install_site import InstallError, install, read_kit, select_site_values  # noqa: E402
from local_project import localize, server_ports  # noqa: E402
from processes import ProcessTracker  # noqa: E402
from stage_job import StageError, parse_json_assignment, stage_job  # noqa: E402

import yaml  # noqa: E402

ERROR_LINE = re.compile(r" - (ERROR|CRITICAL) - ")
NVFLARE = os.path.join(os.path.dirname(sys.executable), "nvflare")
if not os.path.exists(NVFLARE):
    NVFLARE = "nvflare"


class PocError(RuntimeError):
    """A step failed; the message says which and why."""


def log(msg: str) -> None:
    print(f"[run_poc {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def poc_env(workspace: str) -> Dict[str, str]:
    """Environment of every FLARE command and service: FLARE state isolated in the workspace, this Python first."""
    env = dict(os.environ)
    env.setdefault("MEDFLARE_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "medflare"))
    env["HOME"] = os.path.join(workspace, "home")
    env["NVFLARE_POC_WORKSPACE"] = os.path.join(workspace, "poc")
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)  # jobs must run on the code they ship (or the sites installed), not a dev copy
    os.makedirs(env["HOME"], exist_ok=True)
    return env


def run_cli(args: List[str], env: Dict[str, str], timeout: float, log_file: str, json_out: bool = False,
            on_poll: Optional[Callable[[], None]] = None, accept_error: bool = False) -> Any:
    """Run ``nvflare ARGS`` (killed after ``timeout`` s); output is appended to ``log_file``; ``on_poll`` is called
    every 2 s while it runs. With ``json_out`` returns the ``data`` of the JSON result (with ``accept_error``
    also that of an error result, e.g. ``job wait`` on a failed job)."""
    cmd = [NVFLARE] + (["--format", "json"] if json_out else []) + args
    what = f"'nvflare {' '.join(args[:2])}'"
    with open(log_file, "a") as out, tempfile.TemporaryFile("w+") as captured:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=captured, stderr=subprocess.STDOUT,
                                text=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    out.write(f"(killed after {timeout:.0f}s)\n")
                    raise PocError(f"{what} did not finish within {timeout:.0f}s")
                if on_poll:
                    on_poll()
                try:
                    proc.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:  # timed out, or this runner was interrupted: never leave the command behind
                proc.kill()
                proc.wait()
        captured.seek(0)
        text = captured.read()
        out.write(text)
    result = None
    for line in reversed(text.strip().splitlines()):
        if json_out and line.startswith("{"):
            result = json.loads(line)
            break
    if result is not None and accept_error and result.get("data"):
        return result["data"]
    if proc.returncode != 0:
        detail = text.strip().splitlines()[-5:]
        raise PocError(f"{what} failed (exit {proc.returncode}): " + " | ".join(detail))
    if not json_out:
        return text
    if result is not None:
        if result.get("status") != "ok":
            raise PocError(f"{what} answered {result}")
        return result.get("data") or {}
    raise PocError(f"{what} printed no JSON result: {text[-500:]}")


def error_lines(root: str) -> List[str]:
    lines = []
    for path in sorted(glob.glob(os.path.join(root, "**", "log.txt"), recursive=True)):
        with open(path, errors="replace") as f:
            lines += [f"{os.path.relpath(path, root)}: {ln.rstrip()}" for ln in f if ERROR_LINE.search(ln)]
    return lines


HINTS = (
    ("is not in allow_list", "a site refused a class of a job without shipped code: install medflare at every site "
                             "(install_code: true) and keep 'medflare.' in allowed_classes, or ship the code (--code "
                             "shipped)"),
    ("BYOC not permitted", "a site does not let the submitter's role ship code: add the role to byoc_roles in that "
                           "site's values, or run the job on site-installed code (--code site)"),
    ("not authorized", "the submitter's role lacks a right (submit_roles / byoc_roles in the site values)"),
)


def hints(lines: List[str]) -> List[str]:
    return [hint for marker, hint in HINTS if any(marker in ln for ln in lines)]


def describe_results(job_dir: str, sites: List[str]) -> Dict[str, Any]:
    """Where the downloaded results are, and the headline numbers of the metrics summary."""
    ws = os.path.join(job_dir, "workspace")
    out: Dict[str, Any] = {"workspace": ws}
    for key, rel in (("global_model", "app_server/FL_global_model.pt"),
                     ("best_model", "app_server/best_FL_global_model.pt"),
                     ("metrics_summary", "metrics/metrics_summary.json"),
                     ("cross_site_matrix", "metrics/cross_site_dice.csv"),
                     ("cross_site_results", "cross_site_val/cross_val_results.json")):
        path = os.path.join(ws, rel)
        out[key] = path if os.path.isfile(path) else None
    if out["metrics_summary"]:
        with open(out["metrics_summary"]) as f:
            summary = json.load(f)
        cross = summary.get("cross_site") or {}
        out["rounds"] = len(summary.get("rounds") or [])
        out["cross_site_sites"] = sorted((cross.get("matrix") or {}).get("global", {}))
        if isinstance(cross.get("global"), dict):
            out["global_mean_dice"] = cross["global"].get("mean")
    missing = [k for k in ("global_model", "metrics_summary", "cross_site_results") if not out[k]]
    if missing:
        raise PocError(f"downloaded results lack {missing} (in {ws})")
    return out


def prepare(args: argparse.Namespace, env: Dict[str, str], cli_log: str) -> Dict[str, Any]:
    """Project copy + ``poc prepare`` + site configs. Returns paths of the prepared system."""
    with open(os.path.join(HERE, "project.yml")) as f:
        project = yaml.safe_load(f)
    local = localize(project, clients=args.sites, port=args.port)
    project_file = os.path.join(args.workspace, "project.yml")
    with open(project_file, "w") as f:
        yaml.safe_dump(local, f, sort_keys=False)
    ports = server_ports(local)
    log(f"preparing POC for {local['name']}: sites {args.sites or 'all'}, loopback port {ports['fed_learn_port']}")
    run_cli(["poc", "prepare", "-i", project_file, "--force"], env, 180, cli_log)
    prod = os.path.join(env["NVFLARE_POC_WORKSPACE"], local["name"], "prod_00")
    participants = [p["name"] for p in local["participants"]]
    admin = [p["name"] for p in local["participants"] if p["type"] == "admin" and p.get("role") == "project_admin"][0]
    server = [p["name"] for p in local["participants"] if p["type"] == "server"][0]
    sites = [p["name"] for p in local["participants"] if p["type"] == "client"]

    with open(args.values) as f:
        values_raw = json.load(f)
    for name in [server] + sites:
        kit = read_kit(os.path.join(prod, name))
        values = select_site_values(values_raw, kit.name, args.values)
        if args.code == "site":
            values["install_code"] = True
        result = install(kit.path, values, source=f"{args.values} [{kit.name}]")
        log(f"installed site config of {name}: {', '.join(sorted(result['files']))}"
            + (" + local/custom/medflare" if values.get("install_code") else ""))
    return {"prod": prod, "admin_kit": os.path.join(prod, admin), "server": server, "sites": sites,
            "participants": [os.path.join(prod, p) for p in participants], "ports": ports}


def run(args: argparse.Namespace) -> int:
    args.workspace = os.path.abspath(args.workspace)
    args.values = os.path.abspath(args.values)
    if os.path.exists(args.workspace) and not args.force:
        if os.listdir(args.workspace):
            raise PocError(f"workspace {args.workspace} exists; pass --force to replace it")
    if os.path.exists(args.workspace):
        shutil.rmtree(args.workspace)
    os.makedirs(args.workspace)
    env = poc_env(args.workspace)
    cli_log = os.path.join(args.workspace, "nvflare_cli.log")
    results_dir = os.path.abspath(args.results or os.path.join(args.workspace, "results"))
    os.makedirs(results_dir, exist_ok=True)
    summary: Dict[str, Any] = {"job": os.path.abspath(args.job), "code": args.code, "workspace": args.workspace,
                               "status": None, "ok": False, "timings_s": {}}
    tracker = ProcessTracker()
    started = False
    t0 = time.monotonic()
    try:
        system = prepare(args, env, cli_log)
        summary.update(sites=system["sites"], admin_kit=system["admin_kit"], ports=system["ports"])
        executor_args = dict(parse_json_assignment(a) for a in args.executor_arg)
        staged = stage_job(args.job, os.path.join(args.workspace, "jobs"), code=args.code,
                           num_rounds=args.num_rounds, min_clients=args.min_clients, executor_args=executor_args,
                           cross_site_local_models=args.cross_site_local_models)
        summary["staged_job"] = staged
        summary["timings_s"]["prepare"] = round(time.monotonic() - t0, 1)

        log("starting server and sites (nvflare poc start)")
        t = time.monotonic()
        started = True
        try:
            # FLARE's own readiness wait (30 s by default) is too short on a loaded host: give it ours
            ready_wait = max(30, args.start_timeout - 20)
            run_cli(["poc", "start", "--timeout", str(ready_wait)], env, args.start_timeout, cli_log)
        finally:
            tracker.add_pid_files(system["participants"])
            tracker.refresh()
        summary["timings_s"]["start"] = round(time.monotonic() - t, 1)

        kit = ["--startup-kit", system["admin_kit"]]
        t = time.monotonic()
        job_id = run_cli(["job", "submit", "-j", staged] + kit, env, 120, cli_log, json_out=True)["job_id"]
        summary["job_id"] = job_id
        log(f"submitted {os.path.basename(staged)} as job {job_id}; waiting up to {args.timeout}s")
        waited = run_cli(["job", "wait", job_id, "--timeout", str(args.timeout)] + kit, env, args.timeout + 60,
                         cli_log, json_out=True, on_poll=tracker.refresh, accept_error=True)
        tracker.refresh()
        summary["status"] = waited.get("status")
        summary["timings_s"]["job"] = round(time.monotonic() - t, 1)
        log(f"job {job_id}: {summary['status']} after {summary['timings_s']['job']}s")

        downloaded = run_cli(["job", "download", job_id, "-o", results_dir, "--force"] + kit, env, 300, cli_log,
                             json_out=True)
        job_results = downloaded.get("download_path") or os.path.join(results_dir, job_id)
        log(f"results in {job_results}")
        if summary["status"] != "FINISHED:COMPLETED":
            raise PocError(f"job {job_id} ended {summary['status']}; see the ERROR lines below and {job_results}")
        summary["results"] = describe_results(job_results, system["sites"])
        summary["ok"] = True
    except (PocError, InstallError, StageError) as e:
        summary["failure"] = str(e)
        log(f"FAILED: {e}")
    finally:
        if started:
            summary["stop"] = stop_system(env, cli_log, tracker, args.stop_timeout)
        summary["error_lines"] = [ln for d in (env["NVFLARE_POC_WORKSPACE"], results_dir) if os.path.isdir(d)
                                  for ln in error_lines(d)]
        summary["timings_s"]["total"] = round(time.monotonic() - t0, 1)
        with open(os.path.join(results_dir, "run_summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        log(f"summary: {os.path.join(results_dir, 'run_summary.json')}")
    for line in summary["error_lines"][:20]:
        log(f"log error: {line[:400]}")
    for hint in hints(summary["error_lines"] + [summary.get("failure") or ""]):
        log(f"hint: {hint}")
    if summary["ok"]:
        r = summary["results"]
        log(f"OK: {r.get('rounds')} rounds, cross-site matrix over {r.get('cross_site_sites')}, "
            f"global mean Dice {r.get('global_mean_dice')}")
    return 0 if summary["ok"] else 1


def stop_system(env: Dict[str, str], cli_log: str, tracker: ProcessTracker, timeout: float) -> Dict[str, Any]:
    """``nvflare poc stop``, then make sure every tracked process is gone (by id)."""
    tracker.refresh()
    report: Dict[str, Any] = {"tracked": tracker.describe()}
    log(f"stopping the POC system ({len(tracker.procs)} processes tracked)")
    try:
        run_cli(["poc", "stop"], env, timeout, cli_log)
        report["poc_stop"] = "ok"
    except PocError as e:
        report["poc_stop"] = str(e)
        log(f"poc stop: {e}")
    signalled = tracker.stop(grace=30.0)
    report.update(signalled)
    report["left_running"] = tracker.alive()
    if signalled["terminated"] or signalled["killed"]:
        log(f"had to terminate {signalled['terminated']} and kill {signalled['killed']}")
    if report["left_running"]:
        log(f"WARNING: still running: {report['left_running']}")
    else:
        log("all POC processes have exited")
    return report


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default=os.path.join(ROOT, "jobs", "fedavg"), help="job folder (default jobs/fedavg)")
    parser.add_argument("--sites", nargs="+", help="sites of poc/project.yml to run (default: all)")
    parser.add_argument("--workspace", default=os.path.join(ROOT, "workspaces", "poc"),
                        help="folder for the POC system, FLARE state and results (default workspaces/poc)")
    parser.add_argument("--force", action="store_true", help="replace an existing workspace")
    parser.add_argument("--values", default=os.path.join(HERE, "sites.json"), help="site values (default poc/sites.json)")
    parser.add_argument("--code", choices=["shipped", "site"], default="shipped",
                        help="ship the code with the job (BYOC) or install it at every site")
    parser.add_argument("--cross-site-local-models", action="store_true",
                        help="also evaluate the sites' local models across sites (needs share_local_model at the "
                             "sites); default: global models only")
    parser.add_argument("--results", help="download folder (default <workspace>/results)")
    parser.add_argument("--port", type=int, help="server port (default: a free one)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds to wait for the job")
    parser.add_argument("--start-timeout", type=int, default=180, help="seconds for 'nvflare poc start'")
    parser.add_argument("--stop-timeout", type=int, default=120, help="seconds for 'nvflare poc stop'")
    parser.add_argument("--num-rounds", type=int, help="override the job's num_rounds")
    parser.add_argument("--min-clients", type=int, help="override the job's min_clients")
    parser.add_argument("--executor-arg", action="append", default=[], metavar="KEY=JSON",
                        help="override an executor argument, e.g. 'synthetic={\"n_train\": 32, \"n_val\": 8}'")
    args = parser.parse_args(argv)

    def _terminated(signum, frame):  # stop the system also when this runner is terminated
        raise PocError(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, _terminated)
    try:
        return run(args)
    except PocError as e:
        log(f"FAILED: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
