#!/usr/bin/env python3
"""The fairness jobs in one process: the job's own executor, aggregator and shareable generator, driven as FLARE's
ScatterAndGather drives them, without messaging.

A job of the fairness suite (``jobs/fedism``, ``jobs/fedavg_cls``...) is built from its spec
(``tools/jobspec.py``) exactly as its FLARE config is written; the components of that config are instantiated
here, one executor per site (each with its own app folder for client state), and every round goes through the same
calls as in FLARE: the global model to a train task (``learnable_to_shareable``), each site's restricted view of it
(:func:`medflare.flare.site_view.site_view`), ``execute("train")``, the controller's metric check
(:func:`medflare.common.reports.clean_metrics`), ``accept`` and ``aggregate``, ``shareable_to_learnable``. So a run here
follows the simulator's run of the job to the last digit at the same thread count (one per site), at a fraction of
its time: no polling, no process start-up, no persistence.

    python benchmarks/fair_loop.py --methods fedavg_cls fedism --seeds 0 1 --qualities hq hq hq lowres \\
        --split val --out docs/results/fedism/tuning.jsonl --set fedism:rho=0.01

Methods are job names with optional settings (``fedism:rho=0.01``, ``fedism:agg.q=5``, ``fedavg_cls:optimizer=gsam``,
as in ``benchmarks/compare_fairness.py``), and ``local``: every site trains alone with ``fedavg_cls``'s executor for
the same rounds (no aggregation), the reference of what a site gets without the federation.

Each run appends one JSON line to ``--out``: the method, its job settings, the benchmark, the code version, and per
round every site's validation and test balanced accuracy of the global model it received, its aggregation weight
and sharpness, the global clean/corrupted test sets; then the final global model (each site's own model for
``local``) on every site's validation and test split. ``benchmarks/fair_report.py`` makes the tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "custom"), os.path.join(ROOT, "tools"), os.path.join(ROOT, "benchmarks")]

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable  # noqa: E402
from nvflare.apis.fl_constant import ReservedKey, ReturnCode  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_copy  # noqa: E402
from nvflare.apis.signal import Signal  # noqa: E402
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable  # noqa: E402
from nvflare.app_common.app_constant import AppConstants  # noqa: E402

from compare import parse_method  # noqa: E402
from compare_fairness import split_overrides  # noqa: E402
from jobspec import FAIRNESS_SUITE, get_job, job_files  # noqa: E402
from medflare.keys import AGGREGATION_WEIGHTS_KEY, SITE_REPORT_KEY, SHARPNESS  # noqa: E402
from medflare.common.reports import clean_metrics  # noqa: E402
from medflare.flare.site_view import site_view  # noqa: E402

LOCAL = "local"  # every site alone, with fedavg_cls's executor
BASE_OF_LOCAL = "fedavg_cls"


class FederationError(RuntimeError):
    """A site or the server rule failed; the message names which."""


def instantiate(entry: Dict[str, Any]) -> Any:
    """The component a FLARE config entry ``{"id", "path", "args"}`` describes."""
    module, name = entry["path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**entry.get("args", {}))


def code_version() -> str:
    """The commit of the code (with ``+changes`` when the tree differs from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "custom", "benchmarks"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def job_spec(method: str, rounds: int, seed: int, synthetic: Dict[str, Any], n_sites: int):
    """The job spec of ``method`` (a job name with ``key=value`` executor or ``agg.key=value`` aggregator settings)."""
    name, overrides = parse_method(method)
    if name == LOCAL:
        name = BASE_OF_LOCAL
    # figures that only the reports use are measured here, on the final model: the global test sets (instead of
    # every round at site-1) and no score of each new local model (neither changes what is trained)
    overrides = {"global_test_sites": [], "evaluate_local_model": False, **overrides}
    if name not in FAIRNESS_SUITE:
        raise ValueError(f"unknown method {method!r}: give one of {[*FAIRNESS_SUITE, LOCAL]}, with settings")
    client, aggregator = split_overrides(overrides)
    return get_job(name).with_changes(executor_args={**client, "synthetic": {**synthetic, "seed": seed}},
                                      aggregator_args=aggregator, num_rounds=rounds, seed=seed, n_sites=n_sites)


class InProcessFederation:
    """One job's server components and one executor per site, in this process.

    Args:
        spec: the job spec (its FLARE config is written from it and instantiated).
        sites: site names.
        workdir: parent of the sites' app folders (client state).
    """

    def __init__(self, spec, sites: Sequence[str], workdir: str) -> None:
        files = job_files(spec)
        server = files["app/config/config_fed_server.json"]
        client = files["app/config/config_fed_client.json"]
        components = {c["id"]: c for c in server["components"]}
        self.num_rounds = int(server["num_rounds"])
        self.sites = list(sites)
        self.aggregator = instantiate(components["aggregator"])
        self.generator = instantiate(components["shareable_generator"])
        persistor = instantiate(components["persistor"])
        self.global_model = make_model_learnable(
            {k: v.detach().cpu().numpy() for k, v in persistor.model.state_dict().items()}, {})
        for component in (self.aggregator, self.generator):
            component.system_panic = self._panic
        self.executors = {}
        for site in self.sites:
            executor = instantiate(client["executors"][0]["executor"])
            app_dir = os.path.join(workdir, site)
            os.makedirs(app_dir, exist_ok=True)
            executor.start(site, app_dir)
            self.executors[site] = executor
        self.ctx = FLContext()

    @staticmethod
    def _panic(reason: str, fl_ctx: FLContext) -> None:
        raise FederationError(reason)

    def _run_task(self, site: str, task_name: str, task: Shareable) -> Shareable:
        result = self.executors[site].execute(task_name, task, FLContext(), Signal())
        rc = result.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            error = self.executors[site]._setup_error or "see the log above"
            raise FederationError(f"site '{site}' returned {rc} for '{task_name}': {error}")
        return result

    def train_round(self, rnd: int, own_models: Optional[Dict[str, Dict[str, np.ndarray]]] = None
                    ) -> Dict[str, Dict[str, Any]]:
        """One round; returns each site's metrics and report of the model it received. With ``own_models``
        (local-only training) each site receives its own model instead of the global one, and nothing is
        aggregated."""
        ctx = self.ctx
        ctx.set_prop(AppConstants.GLOBAL_MODEL, self.global_model, private=True, sticky=True)
        ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=True)
        ctx.set_prop(AppConstants.NUM_ROUNDS, self.num_rounds, private=True, sticky=False)
        task = self.generator.learnable_to_shareable(self.global_model, ctx)
        task.set_header(AppConstants.CURRENT_ROUND, rnd)
        task.set_header(AppConstants.NUM_ROUNDS, self.num_rounds)
        task.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
        seen: Dict[str, Dict[str, Any]] = {}
        for site in self.sites:
            mine = site_view(make_copy(task), site)
            if own_models is not None and site in own_models:
                DXO(DataKind.WEIGHTS, data=own_models[site]).update_shareable(mine)
            result = self._run_task(site, AppConstants.TASK_TRAIN, mine)
            result.set_header(ReservedHeaderKey.PEER_PROPS, {ReservedKey.IDENTITY_NAME: site})
            result.set_header(ReservedHeaderKey.COOKIE_JAR, mine.get_header(ReservedHeaderKey.COOKIE_JAR))
            dxo = from_shareable(result)
            initial, _ = clean_metrics(site, dxo.get_meta_prop(MetaKey.INITIAL_METRICS))
            report, _ = clean_metrics(site, dxo.get_meta_prop(SITE_REPORT_KEY))
            dxo.set_meta_prop(MetaKey.INITIAL_METRICS, initial)
            dxo.update_shareable(result)
            seen[site] = {"val": initial, "report": report}
            if own_models is not None:
                own_models[site] = self.executors[site].local_weights
            elif not self.aggregator.accept(result, ctx):
                raise FederationError(f"round {rnd}: the aggregator refused the update of site '{site}'")
        if own_models is None:
            aggregate = self.aggregator.aggregate(ctx)
            self.global_model = self.generator.shareable_to_learnable(aggregate, ctx)
            self.aggregator.reset(ctx)
        return seen

    def evaluate(self, site: str, weights: Dict[str, np.ndarray]) -> Dict[str, float]:
        """Balanced accuracy of ``weights`` on the site's validation and test splits (the test figure through the
        executor's cross-site evaluation path, as FLARE scores a global model)."""
        task = DXO(DataKind.WEIGHTS, data=weights).to_shareable()
        task.set_header(AppConstants.MODEL_OWNER, "SRV_FL_global_model.pt")
        test = from_shareable(self._run_task(site, AppConstants.TASK_VALIDATION, task)).data
        executor = self.executors[site]
        return {"val": float(executor.evaluate(executor.data.val)["bacc"]), "test": float(test["bacc"])}

    def global_test(self, weights: Dict[str, np.ndarray], synthetic: Dict[str, Any]) -> Dict[str, float]:
        """Balanced accuracy of ``weights`` on the benchmark's global clean and corrupted test sets."""
        from medflare.flare.executors.base import load_weights

        executor = self.executors[self.sites[0]]
        load_weights(executor.model, weights, "final global model")
        return global_test_scores(executor, synthetic)


def global_test_scores(executor, synthetic: Dict[str, Any]) -> Dict[str, float]:
    """Balanced accuracy of the model loaded in ``executor`` on the benchmark's global clean and corrupted test
    sets."""
    from medflare.classification.data import synthetic_config
    from medflare.classification.synthetic import load_global_test
    from medflare.data.placement import TensorDictDataset

    sets = load_global_test(synthetic_config(synthetic))
    return {name: float(executor.evaluate(TensorDictDataset.from_arrays(sets[name], sets["labels"]))["bacc"])
            for name in ("clean", "corrupted")}


def run(method: str, seed: int, rounds: int, synthetic: Dict[str, Any], sites: Sequence[str],
        verbose: bool = False) -> Dict[str, Any]:
    """Train ``rounds`` rounds of ``method``; return its record."""
    torch.set_num_threads(1)
    spec = job_spec(method, rounds, seed, synthetic, len(sites))
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="medflare-fair-") as workdir:
        fed = InProcessFederation(spec, sites, workdir)
        own = {} if parse_method(method)[0] == LOCAL else None
        history = []
        for rnd in range(rounds):
            seen = fed.train_round(rnd, own)
            weights = (fed.global_model.get(ModelLearnableKey.META) or {}).get(AGGREGATION_WEIGHTS_KEY) or {}
            entry = {"round": rnd,
                     "val": {s: seen[s]["val"].get("bacc") for s in sites},
                     "test": {s: seen[s]["report"].get("test_bacc") for s in sites},
                     "weight": {s: weights.get(s) for s in sites},
                     "sharpness": {s: seen[s]["report"].get(SHARPNESS) for s in sites},
                     "global_test": {k: v for s in sites for k, v in seen[s]["report"].items()
                                     if k in ("test_clean_bacc", "test_corrupted_bacc")},
                     "quality": {s: seen[s]["report"].get("quality") for s in sites}}
            history.append(entry)
            if verbose:
                print(f"  round {rnd:2d} test " + " ".join(f"{s} {v:.3f}" for s, v in entry["test"].items()),
                      flush=True)
        final_weights = dict(fed.global_model[ModelLearnableKey.WEIGHTS])
        final = {s: fed.evaluate(s, own[s] if own is not None else final_weights) for s in sites}
        global_test = None if own is not None else fed.global_test(final_weights, spec.executor.args["synthetic"])
    return {"method": method, "seed": seed, "rounds": rounds, "synthetic": synthetic, "sites": list(sites),
            "job": {"executor": spec.executor.args, "aggregator": spec.aggregator.args}, "code": code_version(),
            "history": history, "final": final, "global_test": global_test, "seconds": round(time.time() - start, 1)}


def benchmark_settings(args: argparse.Namespace) -> tuple:
    """The benchmark's ``synthetic`` settings and site names of the command line."""
    synthetic: Dict[str, Any] = {"n_train": args.n_train, "n_val": args.n_val, "n_test": args.n_test}
    if args.n_site_test:
        synthetic["n_site_test"] = args.n_site_test
    n_sites = 4
    if args.qualities:
        synthetic["qualities"] = list(args.qualities)
        n_sites = len(args.qualities)
    if args.n_clients:
        synthetic.update(n_clients=args.n_clients, n_corrupted=args.n_corrupted, severity=args.severity,
                         alpha=args.alpha)
        n_sites = args.n_clients
    return synthetic, [f"site-{k + 1}" for k in range(n_sites)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=[*FAIRNESS_SUITE, LOCAL])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--n-val", type=int, default=64)
    ap.add_argument("--n-test", type=int, default=200, help="images of the global clean and corrupted test sets")
    ap.add_argument("--n-site-test", type=int, default=0, help="test images per site (0: the benchmark's 128)")
    ap.add_argument("--qualities", nargs="+", help="site qualities, e.g. hq hq hq lowres (default: the job's)")
    ap.add_argument("--n-clients", type=int, default=0, help="the paper-like setting: N clients, the last k noisy")
    ap.add_argument("--n-corrupted", type=int, default=4)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--out", help="append each run's record as a JSON line to this file")
    ap.add_argument("--tag", default="", help="a name for the runs' setting in the tables (e.g. minority)")
    ap.add_argument("--verbose", action="store_true", help="print every round's test figures")
    args = ap.parse_args(argv)
    logging.getLogger().setLevel(logging.WARNING)
    synthetic, sites = benchmark_settings(args)
    for seed in args.seeds:
        for method in args.methods:
            record = {"tag": args.tag, **run(method, seed, args.rounds, synthetic, sites, args.verbose)}
            test = [v["test"] for v in record["final"].values()]
            print(f"{args.tag} {method} seed {seed}: test mean {np.mean(test):.3f} worst {np.min(test):.3f} "
                  f"({record['seconds']:.0f}s)", flush=True)
            if args.out:
                os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
