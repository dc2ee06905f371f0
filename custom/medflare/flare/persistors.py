"""Model persistor: keeps the last and the best global model, never writes a corrupted checkpoint, and writes a
provenance record into every checkpoint (see :mod:`medflare.artefacts.provenance`)."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from ..artefacts import provenance as prov
from ..common.atomic import torch_save_atomic
from ..classification.models import CLASSIFIER_REGISTRY
from ..networks import build_model
from ..keys import SITE_REPORT_KEY


class CheckpointError(RuntimeError):
    """A model about to be saved contains non-finite values."""


def check_finite_state(state: Dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first parameter with NaN or infinite values."""
    for name, value in state.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise CheckpointError(f"refusing to save a global model whose parameter '{name}' is not finite")


class ModelPersistor(PTFileModelPersistor):
    """:class:`PTFileModelPersistor` that builds its network (any of :data:`medflare.networks.MODEL_REGISTRY`:
    segmentation or classification) from a job argument and checks weights before saving.

    It writes ``FL_global_model.pt`` (last round) and ``best_FL_global_model.pt`` (best mean of the key metric, Dice or
    balanced accuracy, as chosen by ``IntimeModelSelector``) into the server's app folder, atomically. Each checkpoint
    carries a provenance record (:data:`medflare.artefacts.provenance.PROVENANCE_KEY`): the model arguments, the sites'
    preprocessing (read from the job's client config, which the server's app folder holds), the job, method, rounds
    completed, the sites with their sample counts and last reported metrics, and, once cross-site evaluation has run,
    its results. Collecting the record never stops a run: what cannot be read is logged and left out.

    Args:
        model: ``{"name": "unet", **constructor kwargs}`` (see :func:`medflare.networks.build_model`); the job spec
            derives it from the executor's settings (``persistor_model`` in ``tools/jobspec.py``).
        seed: seed of the initial weights, so that runs of different methods start from the same model.
        preprocessing: the sites' preprocessing settings to record (see
        :func:`medflare.artefacts.provenance.executor_preprocessing`);
            ``None`` (default) reads them from the job's client config.
        **kwargs: passed to :class:`PTFileModelPersistor` (``source_ckpt_file_full_name`` resumes from a checkpoint).
    """

    def __init__(self, model: Optional[Dict[str, Any]] = None, seed: int = 0,
                 preprocessing: Optional[Dict[str, Any]] = None, **kwargs: Any) -> None:
        spec = dict(model or {})
        self.model_spec = {"name": spec.pop("name", "unet"), **spec}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = build_model(self.model_spec["name"], **spec)
        super().__init__(model=network, **kwargs)
        self.seed = seed
        self.preprocessing = prov.plain(preprocessing) if preprocessing else None
        self.key_metric = "dice"
        self._job: Dict[str, Any] = {}
        self._method: Dict[str, Any] = {}
        self._sites: Dict[str, Dict[str, Any]] = {}
        self._cross_site: Dict[str, Dict[str, Any]] = {}

    # ------------------------------------------------------------------ provenance
    def _read_job(self, fl_ctx: FLContext) -> None:
        """Job name, method and preprocessing from the run folder and the app's configs (at ``START_RUN``)."""
        workspace = fl_ctx.get_engine().get_workspace()
        job_id = fl_ctx.get_job_id()
        app_dir = workspace.get_app_dir(job_id)
        self._job = prov.read_job(workspace.get_run_dir(job_id))
        client_config = prov.read_config(app_dir, "config_fed_client.json")
        self._method = prov.method_record(prov.read_config(app_dir, "config_fed_server.json") or {}, client_config)
        executor = self._method.get("executor") or {}
        if not executor.get("path"):
            if self.preprocessing is None:
                self.log_warning(fl_ctx, "the server holds no client config: checkpoints will not record the "
                                         "preprocessing (give the persistor a 'preprocessing' argument)")
            return
        from nvflare.fuel.utils.class_utils import instantiate_class

        site_executor = instantiate_class(executor["path"], executor["args"])  # only to read its settings
        self.key_metric = getattr(site_executor, "key_metric", self.key_metric)
        if self.preprocessing is None:
            self.preprocessing = prov.executor_preprocessing(site_executor)

    def _record_contribution(self, fl_ctx: FLContext) -> None:
        """Sample count and reported metrics of a site's accepted training result."""
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        dxo = from_shareable(result)
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        metrics = {**(dxo.get_meta_prop(MetaKey.INITIAL_METRICS) or {}), **(dxo.get_meta_prop(SITE_REPORT_KEY) or {})}
        self._sites[site] = {"n_samples": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                             "round": fl_ctx.get_prop(AppConstants.CURRENT_ROUND), "metrics": metrics}

    def _record_validation(self, fl_ctx: FLContext) -> None:
        """One cross-site result: the metrics of one model on one site's data."""
        dxo = from_shareable(fl_ctx.get_prop(AppConstants.VALIDATION_RESULT))
        if dxo.data_kind == DataKind.METRICS:
            site = fl_ctx.get_prop(AppConstants.DATA_CLIENT, "?")
            owner = fl_ctx.get_prop(AppConstants.MODEL_OWNER, "?")
            self._cross_site.setdefault(site, {})[owner] = dict(dxo.data)

    def provenance(self, checkpoint_model: str, rounds_completed: int) -> Dict[str, Any]:
        """The record for the checkpoint of ``checkpoint_model`` (``"global"`` or ``"best_global"``)."""
        task = (self.preprocessing or {}).get("task") or (
            "classification" if self.model_spec["name"] in CLASSIFIER_REGISTRY else "segmentation")
        cross = (prov.cross_site_record(self._cross_site, checkpoint_model, self.key_metric) if self._cross_site
                 else None)
        return prov.build_record(task, self.model_spec, self.seed, self.preprocessing, self._job, self._method,
                                 checkpoint_model, rounds_completed, self._sites, cross, prov.library_versions())

    def _stamp(self, fl_ctx: FLContext, checkpoint_model: str, rounds_completed: int) -> None:
        """Put the record into the checkpoint about to be written (FLARE keeps extra top-level keys)."""
        try:
            record = self.provenance(checkpoint_model, rounds_completed)
        except Exception as e:  # provenance never stops a run
            self.log_warning(fl_ctx, f"no provenance recorded for the {checkpoint_model} model: {e}")
            return
        self._get_persistence_manager(fl_ctx).other_props[prov.PROVENANCE_KEY] = record

    def _add_cross_site(self, fl_ctx: FLContext) -> None:
        """At the end of the run: add the cross-site results to the checkpoints already written."""
        for name, path in (("global", self._ckpt_save_path), ("best_global", self._best_ckpt_save_path)):
            if not os.path.isfile(path):
                continue
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            record = checkpoint.get(prov.PROVENANCE_KEY)
            if record is None:
                continue
            record["cross_site"] = prov.cross_site_record(self._cross_site, name, self.key_metric)
            torch_save_atomic(checkpoint, path)
        self.log_info(fl_ctx, "cross-site results recorded in the checkpoints' provenance")

    def _guarded(self, what: str, step: Any, fl_ctx: FLContext) -> None:
        try:
            step(fl_ctx)
        except Exception as e:  # provenance never stops a run
            self.log_warning(fl_ctx, f"provenance: cannot {what}: {e}")

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE:
            # the model the sites just evaluated: the one sent this round, i.e. after CURRENT_ROUND rounds
            self._stamp(fl_ctx, "best_global", int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND, 0)))
        super().handle_event(event, fl_ctx)
        if event == EventType.START_RUN:
            self._guarded("read the job's configs", self._read_job, fl_ctx)
        elif event == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._guarded("read a training result", self._record_contribution, fl_ctx)
        elif event == AppEventType.VALIDATION_RESULT_RECEIVED:
            self._guarded("read a cross-site result", self._record_validation, fl_ctx)
        elif event == EventType.END_RUN and self._cross_site:
            self._guarded("add cross-site results to the checkpoints", self._add_cross_site, fl_ctx)

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext) -> None:
        self._stamp(fl_ctx, "global", int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND, -1)) + 1)
        super().save_model(ml, fl_ctx)

    def save_model_file(self, save_path: str) -> None:
        check_finite_state(self.persistence_manager.to_persistence_dict()["model"])
        super().save_model_file(save_path)


SegmentationModelPersistor = ModelPersistor
"""The former name, which job folders written before the rename still give."""
