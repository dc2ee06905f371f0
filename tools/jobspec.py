"""Every medflare job, defined once: the job folders under ``jobs/`` are generated from :data:`JOBS`.

A :class:`JobSpec` names what differs between jobs (executor and its arguments, controller, aggregator, shareable
generator, key metric, sites, rounds, seed); :func:`job_files` turns it into FLARE's ``meta.json``,
``config_fed_server.json`` and ``config_fed_client.json``, adding what every job shares (the persistor, model
selection, cross-site evaluation and report, TensorBoard streaming). The persistor's ``model`` is derived from the
executor (so the server's initial model always fits the sites' network), and every class and argument is checked
before anything is written.

Runs that change rounds, sites, seeds or executor arguments (tests, benchmark sweeps, staging for POC and
production) call :meth:`JobSpec.with_changes` and :func:`write_job`; nothing edits a job's JSON afterwards.

    python tools/sync_jobs.py           # regenerate jobs/ (configs and shipped code)
    python tools/sync_jobs.py --check   # exit 1 if a committed job differs from this spec
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

from flare_config import Component, check_component, dump_json, ship_code

PERSISTOR = "medflare.flare.persistors.ModelPersistor"
CROSS_SITE_EVAL = "medflare.flare.workflows.CrossSiteEvaluation"
APP = "app"
ALL_SITES = "@ALL"

FEDAVG_M = Component("medflare.flare.server_optimizer.ServerOptimizer", {"optimizer_args": {
    "path": "medflare.flare.server_optimizer.SGD", "args": {"lr": 1.0, "momentum": 0.5}, "config_type": "dict"}})
FULL_MODEL = Component(
    "nvflare.app_common.shareablegenerators.full_model_shareable_generator.FullModelShareableGenerator")
TB_WRITER = Component("nvflare.app_opt.tracking.tb.tb_writer.TBWriter")
EVENT_TO_FED = Component("nvflare.app_common.widgets.convert_to_fed_event.ConvertToFedEvent",
                         {"events_to_convert": ["analytix_log_stats"]})
TB_RECEIVER = Component("nvflare.app_opt.tracking.tb.tb_receiver.TBAnalyticsReceiver",
                        {"events": ["fed.analytix_log_stats"]})
ROUND_LOOP = {"task_check_period": 0.05}
"""How often the server's workflows look at their tasks. FLARE's own period (0.2 s in effect, whatever a
controller sets: see :class:`medflare.flare.workflows.TaskCheckPeriod`) held every round's aggregation 0.2-0.4 s after
the last result arrived; see docs/performance.md."""
MEMORY_GC_ROUNDS = 10
"""ScatterAndGather's memory clean-up (``gc.collect`` and ``malloc_trim``) every this many rounds. FLARE's default,
every round, took 0.2-0.3 s of each round on the server; the sites' memory levels off after about 20 rounds either
way (docs/performance.md), and FLARE's own recipes switch the clean-up off by default."""
MODEL_LOCATOR = Component("nvflare.app_opt.pt.file_model_locator.PTFileModelLocator", {"pt_persistor_id": "persistor"})


def merge_args(args: Mapping[str, Any], changes: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``args`` with ``changes`` set; a dict value is merged into an existing dict (one level deep), so
    ``{"synthetic": {"n_train": 8}}`` changes one setting of the benchmark and keeps the others."""
    merged = dict(args)
    for key, value in (changes or {}).items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class JobSpec:
    """One FLARE job of medflare.

    Attributes:
        name: job name (folder and ``meta.json``).
        executor: the sites' executor (class path and arguments; ``seed`` is added from :attr:`seed`).
        controller: class path of the server's ScatterAndGather workflow.
        aggregator: the server's aggregator.
        shareable_generator: turns the aggregate into the next global model.
        key_metric: the metric that selects the best model and scores fairness (``"dice"``, ``"bacc"``).
        n_sites: sites of the federation; every round waits for this many (``min_clients``).
        num_rounds: rounds of training.
        seed: seed of the initial global model and of the sites' shuffling and initialisation.
        cross_site_local_models: cross-site evaluation also scores every site's last local model (``False``:
            only the global models).
        controller_args: further arguments of the controller (e.g. ``resume_from``).
        server: further top-level settings of ``config_fed_server.json``.
    """

    name: str
    executor: Component
    controller: str
    aggregator: Component
    shareable_generator: Component
    key_metric: str
    n_sites: int
    num_rounds: int = 20
    seed: int = 0
    cross_site_local_models: bool = True
    controller_args: Mapping[str, Any] = field(default_factory=dict)
    server: Mapping[str, Any] = field(default_factory=lambda: {"task_request_interval": 0.05})

    def with_changes(self, executor_args: Optional[Mapping[str, Any]] = None,
                     aggregator_args: Optional[Mapping[str, Any]] = None,
                     controller_args: Optional[Mapping[str, Any]] = None, **fields: Any) -> "JobSpec":
        """A copy with other settings: ``fields`` replace attributes (``num_rounds``, ``n_sites``, ``seed``,
        ``name``...); the argument dicts are merged into the executor's, aggregator's and controller's arguments
        (see :func:`merge_args`). An executor ``seed`` sets :attr:`seed` (the sites' and the initial model's)."""
        executor_args = dict(executor_args or {})
        if "seed" in executor_args:
            fields.setdefault("seed", executor_args.pop("seed"))
        return dataclasses.replace(
            self, executor=Component(self.executor.path, merge_args(self.executor.args, executor_args)),
            aggregator=Component(self.aggregator.path, merge_args(self.aggregator.args, aggregator_args)),
            controller_args=merge_args(self.controller_args, controller_args), **fields)

    @property
    def sites(self) -> list:
        """The site names of the federation (``site-1`` ...)."""
        return [f"site-{i + 1}" for i in range(self.n_sites)]


SEGMENTATION_BENCHMARK: Dict[str, Any] = {"variant": "anatomy", "n_train": 200, "n_val": 60, "n_test": 60}
"""The built-in benchmark of the segmentation jobs: brain tissue on real anatomy (docs/training.md says why)."""
AFFINE_NORM_UNET: Dict[str, Any] = {"name": "unet", "norm": ["instance", {"affine": True}]}
"""The UNet with affine instance norm: the normalisation layers have parameters a site can keep (FedBN)."""


def segmentation_job(name: str, executor: str = "medflare.flare.executors.SegmentationExecutor",
                     controller: str = "medflare.flare.workflows.MetricsScatterAndGather",
                     **executor_args: Any) -> JobSpec:
    """A job of the segmentation benchmark: 3 sites (T1, T2, CT brain anatomy), Dice, weighted averages applied
    with server momentum (FedAvgM)."""
    executor_args = merge_args({"synthetic": SEGMENTATION_BENCHMARK}, executor_args)
    return JobSpec(name, Component(executor, executor_args), controller,
                   Component("medflare.flare.aggregators.WeightedAggregator", {"output": "weight_diff"}), FEDAVG_M,
                   key_metric="dice", n_sites=3)


CLASSIFICATION_EXECUTOR = "medflare.flare.executors.ClassificationExecutor"
CLASSIFIER_SETTINGS: Dict[str, Any] = {
    "model": {"name": "tiny_cnn"}, "num_classes": 4, "in_channels": 1,
    "synthetic": {"n_train": 128, "n_val": 64, "n_test": 200, "seed": 0},
    "lr": 0.001, "weight_decay": 0.0005, "local_epochs": 1, "batch_size": 32, "tau": 1.0, "num_threads": 1,
    "global_test_sites": ["site-1"], "optimizer": "adam", "reports": []}
GSAM = {"optimizer": "gsam", "rho": 0.05, "gsam_alpha": 0.1, "reports": ["sharpness"]}
FEDISM_RHO = 0.02
"""FedISM's GSAM radius (also the radius of its sharpness probe), chosen on validation figures of tuning seeds 0-1
(minority low-resolution setting) as the radius with the largest degraded-site gain among those that keep the clean
sites within 0.02 of FedAvg (0.005, 0.01, 0.02 and the paper's 0.05 were tried). See docs/fedism.md."""


def fairness_job(name: str, rule: str = "medflare.flare.aggregators.WeightedAggregator",
                 rule_args: Optional[Mapping[str, Any]] = None, **executor_args: Any) -> JobSpec:
    """A job of the fairness suite: 4 sites of different image quality, balanced accuracy, the server ``rule``
    (an aggregator) applied to the full models."""
    return JobSpec(name, Component(CLASSIFICATION_EXECUTOR, merge_args(CLASSIFIER_SETTINGS, executor_args)),
                   "medflare.flare.fairness_workflow.FairnessScatterAndGather",
                   Component(rule, dict(rule_args or {})), FULL_MODEL, key_metric="bacc", n_sites=4)


FEDDA = {"mode": "target", "adv_weight": 0.01, "warmup_rounds": 2}
FEDDA_STATS = {"mode": "stats", "adv_weight": 0.1, "warmup_rounds": 2, "disc_lr": 1e-3, "disc_hidden": 64}
ALIGNMENT = "medflare.flare.executors.AdversarialAlignmentExecutor"
FAIR = "medflare.flare.fairness_aggregators."

DITTO = "medflare.flare.executors.DittoExecutor"
FINETUNE_EPOCHS = 20
"""Local fine-tuning epochs of ``fedbn_ft`` at the end of the job: as many as the job's rounds, so that a site
spends on its personal model what Ditto spends (one epoch a round); docs/personalization.md."""
FEDLC = {"model": {"name": "unet_calibrated"}, "local_head": True, "head_steps": 10}
FEDDP = {"local_head": True, "inconsistency_weight": 1.0}

JOBS: Dict[str, JobSpec] = {spec.name: spec for spec in (
    segmentation_job("fedavg"),
    segmentation_job("fedprox", fedprox_mu=0.01),
    segmentation_job("fedbn", model=AFFINE_NORM_UNET, local_norm=True),
    segmentation_job("fedbn_ft", model=AFFINE_NORM_UNET, local_norm=True, finetune_epochs=FINETUNE_EPOCHS),
    segmentation_job("ditto", DITTO, model=AFFINE_NORM_UNET, local_norm=True),
    segmentation_job("fedlc", **FEDLC),
    segmentation_job("feddp", **FEDDP),
    segmentation_job("fedda", ALIGNMENT, **FEDDA),
    segmentation_job("fedda_cyclic", ALIGNMENT, "medflare.flare.workflows.RingRelayScatterAndGather", **FEDDA),
    segmentation_job("fedda_domain", ALIGNMENT, mode="domain", adv_weight=0.03, warmup_rounds=2,
                     model={"name": "unet_domain", "n_domains": 3}),
    segmentation_job("fedda_stats", ALIGNMENT, "medflare.flare.workflows.StatisticsRelayScatterAndGather",
                     **FEDDA_STATS),
    fairness_job("fedavg_cls"),
    fairness_job("afl", FAIR + "AFLAggregator", {"lambda_lr": 0.1}),
    fairness_job("qfedavg", FAIR + "QFedAvgAggregator", {"q": 1.0, "lipschitz": 0.1, "mode": "update"}),
    fairness_job("fairfed", FAIR + "FairFedAggregator", {"beta": 1.0}),
    fairness_job("fedce", FAIR + "FedCEAggregator", {"mode": "times"}, reports=["minus_model"]),
    fairness_job("fedga", FAIR + "FedGAAggregator", {"step": 0.05}, reports=["prev_local"]),
    fairness_job("fedism", FAIR + "FedISMAggregator", {"q": 2.0, "beta": 0.5}, **{**GSAM, "rho": FEDISM_RHO}),
    fairness_job("fedism_plus", FAIR + "FedISMAggregator", {"q": 2.0, "beta": 0.5}, **GSAM, rho_schedule_p=0.5),
)}
FAIRNESS_SUITE = tuple(name for name, spec in JOBS.items() if spec.executor.path == CLASSIFICATION_EXECUTOR)
"""The fairness jobs, baseline (``fedavg_cls``) first, in the order the fairness comparison runs them."""


def persistor_model(executor: Component) -> Dict[str, Any]:
    """The network the sites build (``{"name", **constructor arguments}``), read from the executor itself."""
    site = check_component(executor)(**executor.args)
    return {"name": site.model_name, **site.model_args}


def job_files(spec: JobSpec) -> Dict[str, Dict[str, Any]]:
    """The job folder's config files, ``{path relative to the job folder: content}``, after checking every class
    and argument (raises :class:`flare_config.JobConfigError`)."""
    executor = spec.executor.with_args(seed=spec.seed)
    persistor = Component(PERSISTOR, {"model": persistor_model(executor), "seed": spec.seed})
    metric = {"key_metric": spec.key_metric}
    controller = Component(spec.controller, {
        "min_clients": "{min_clients}", "num_rounds": "{num_rounds}", "wait_time_after_min_received": 600, **metric,
        "aggregator_id": "aggregator", "persistor_id": "persistor", "shareable_generator_id": "shareable_generator",
        **ROUND_LOOP, "memory_gc_rounds": MEMORY_GC_ROUNDS, **spec.controller_args})
    local_models = {} if spec.cross_site_local_models else {"submit_model_task_name": ""}
    cross_site = Component(CROSS_SITE_EVAL, {"model_locator_id": "model_locator", **ROUND_LOOP, **local_models})
    server_components = {
        "persistor": persistor, "shareable_generator": spec.shareable_generator, "aggregator": spec.aggregator,
        "model_selector": Component("nvflare.app_common.widgets.intime_model_selector.IntimeModelSelector", metric),
        "model_locator": MODEL_LOCATOR,
        "cross_site_report": Component("medflare.flare.widgets.CrossSiteReport", metric),
        "tb_receiver": TB_RECEIVER}
    client_components = {"tb_writer": TB_WRITER, "event_to_fed": EVENT_TO_FED}
    for component in (controller, cross_site, *server_components.values(), *client_components.values()):
        check_component(component)
    # every job deploys to all sites: the simulator's -n/-c choose them (the controller refuses to start with fewer
    # than n_sites), POC and provisioned systems bring their own site names
    deploy = [ALL_SITES]
    return {
        "meta.json": {"name": spec.name, "resource_spec": {}, "min_clients": spec.n_sites,
                      "deploy_map": {APP: deploy}},
        f"{APP}/config/config_fed_server.json": {
            "format_version": 2, "server": dict(spec.server), "num_rounds": spec.num_rounds,
            "min_clients": spec.n_sites,
            "workflows": [controller.entry("scatter_and_gather"), cross_site.entry("cross_site_validate")],
            "components": [c.entry(i) for i, c in server_components.items()]},
        f"{APP}/config/config_fed_client.json": {
            "format_version": 2,
            "executors": [{"tasks": ["train", "validate", "submit_model"], "executor": executor.entry("executor")}],
            "components": [c.entry(i) for i, c in client_components.items()]},
    }


def job_texts(spec: JobSpec) -> Dict[str, str]:
    """The canonical text of each config file of the job (see :func:`flare_config.dump_json`)."""
    return {path: dump_json(content) for path, content in job_files(spec).items()}


def folder_differences(spec: JobSpec, job_dir: str) -> List[str]:
    """The config files of ``job_dir`` whose text differs from what ``spec`` generates (empty when equal)."""
    diffs = []
    for rel, text in job_texts(spec).items():
        path = os.path.join(job_dir, rel)
        if not os.path.isfile(path):
            diffs.append(f"{rel}: missing")
            continue
        with open(path) as f:
            if f.read() != text:
                diffs.append(f"{rel}: differs")
    return diffs


def write_job(spec: JobSpec, parent: str, code: bool = True) -> str:
    """Write the job folder ``parent/<name>`` (its configs; with ``code``, a fresh copy of the medflare package in
    ``app/custom``) and return it. Files of the folder that the spec does not write are left alone."""
    job_dir = os.path.join(os.path.abspath(parent), spec.name)
    for path, text in job_texts(spec).items():
        target = os.path.join(job_dir, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(text)
    if code:
        ship_code(os.path.join(job_dir, APP))
    return job_dir


def get_job(name: str) -> JobSpec:
    """The spec of a job by name (``ValueError`` naming the known jobs otherwise)."""
    if name not in JOBS:
        raise ValueError(f"unknown job {name!r}; jobs: {sorted(JOBS)}")
    return JOBS[name]
