"""The template of medflare's FLARE executors: site identity, task dispatch, seeding, device, readiness, client
state, and the skeleton of a training round; the segmentation, FedDA and classification executors fill in hooks."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from ...algorithms.aggregation import weight_difference
from ...common.atomic import torch_save_atomic
from ...keys import SITE_REPORT_KEY
from ...networks import build_model
from ..site_policy import RESEARCH_DEFAULT, PolicyError, SitePolicy, read_site_policy
from .support import (STATE_FILE, StateError, configure_torch, load_weights, read_state_file, resolve_device,
                      weights_to_numpy)

class SiteExecutor(Executor):
    """Template of the medflare executors.

    It learns the site's name, app folder and ``local/`` folder at ``START_RUN`` (or from :meth:`start`), prepares
    the site lazily on the first task (:meth:`_ensure_ready`: thread count and seeds, the site's data through
    :meth:`load_data`, device, model, the trainer from :meth:`create_trainer`, then the saved client state), and
    dispatches ``train``, ``validate`` and ``submit_model``. The site is ready, and runs tasks, only once all of that
    has completed, state included: any error there (a :class:`~medflare.data.DataError`, a :class:`StateError` for
    a corrupt state file...) makes every task of this site fail with the message, which lets the server stop the job
    or carry on without the site; the site never continues on half-prepared or fresh state. Any other exception in a
    task is logged and returned as ``EXECUTION_EXCEPTION``.

    A ``train`` task runs :meth:`_train`: load the received global model (:meth:`unpack_train_data`), measure it
    (:meth:`assess_global_model`), :meth:`before_training`, the trainer's local epochs, :meth:`local_metrics`,
    :meth:`after_training`, keep the local model and the client state (:meth:`state_dict`), and send
    :meth:`trained_report` and :meth:`result_meta` with the weights.

    The hooks, one layer of them, each extended by a subclass with ``super()``:

    ============================  ===========================================================================
    hook                          what a subclass adds there
    ============================  ===========================================================================
    :meth:`load_data`,            the site's datasets; moving them to the device
    :meth:`place_data`
    :meth:`create_trainer`        the local objective (adversarial alignment, GSAM, Ditto, site-local heads)
    :meth:`unpack_train_data`     richer payloads (FedDA's peer encoder and peer statistics)
    :meth:`assess_global_model`   what is measured on the received model (Dice, domain accuracy, sharpness)
    :meth:`before_training`       per-round settings (learning rate, alignment targets, SAM radius)
    :meth:`after_training`        work after local training (a personal model), its scalars
    :meth:`trained_report`,       the documented scalars and meta entries sent with the weights
    :meth:`result_meta`
    :meth:`state_dict`,           what the client state file keeps across worker restarts (optimiser, round,
    :meth:`load_state`            discriminator, personal model)
    :meth:`site_local_keys`,      what never leaves the site; which model cross-site evaluation receives
    :meth:`deployed_weights`
    ============================  ===========================================================================

    Subclasses set, in their constructor, ``model_name``, ``model_args``, ``seed``, ``num_threads``,
    ``device_name``, ``local_epochs`` and ``batch_size``, and implement the hooks that raise ``NotImplementedError``.

    What leaves the site is further limited by the site's own ``local/medflare_policy.json``
    (:mod:`medflare.flare.site_policy`): training curves, the local model for cross-site evaluation, weight differences.

    Args:
        tb_writer_id: id of the client's ``TBWriter`` component ("" disables TensorBoard).
        send_weight_differences: send ``WEIGHT_DIFF`` (local minus received global weights) instead of ``WEIGHTS``,
            e.g. for FLARE's percentile or SVT privacy filters (a site's policy can ask for it too).
        evaluate_local_model: after training, score the new local model on the site's evaluation split and report
            it (``dice_local`` / ``bacc_local``: how far local training moved the site from the global model). It
            costs one pass over the validation split per round (about 8% of a segmentation site's round on the
            built-in benchmark, see ``docs/performance.md``); ``false`` skips it and drops the scalar.
    """

    state_file = STATE_FILE
    state_keys: Sequence[str] = ("local_weights", "optimizer")
    key_metric = "dice"

    def __init__(self, tb_writer_id: str = "tb_writer", send_weight_differences: bool = False,
                 evaluate_local_model: bool = True) -> None:
        super().__init__()
        self.tb_writer_id = tb_writer_id
        self.send_weight_differences = send_weight_differences
        self.evaluate_local_model = evaluate_local_model
        self.policy: SitePolicy = RESEARCH_DEFAULT
        self.site: str = ""
        self._app_dir = ""
        self._local_dir: Optional[str] = None
        self._tb = None
        self._setup_error: Optional[str] = None
        self._ready = False
        self.model: Optional[torch.nn.Module] = None
        self.local_weights: Optional[Dict[str, np.ndarray]] = None
        self.local_round = -1  # the round of the local model (-1: none yet)
        self.data: Any = None
        self.device: Optional[torch.device] = None
        self.trainer: Any = None

    def start(self, site: str, app_dir: str, local_dir: Optional[str] = None) -> None:
        """Take part as ``site``: keep client state in ``app_dir`` and read the site's policy (and data config) from
        ``local_dir``. FLARE's ``START_RUN`` calls it with the job's folders; it also sets a site up without FLARE."""
        self.site, self._app_dir, self._local_dir = site, app_dir, local_dir
        try:
            self.policy = read_site_policy(local_dir)
        except PolicyError as e:
            self._setup_error = str(e)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            engine = fl_ctx.get_engine()
            workspace = engine.get_workspace()
            self.start(fl_ctx.get_identity_name(), workspace.get_app_dir(fl_ctx.get_job_id()),
                       workspace.get_site_config_dir())
            share_curves = self.tb_writer_id and self.policy.share_training_curves
            self._tb = engine.get_component(self.tb_writer_id) if share_curves else None
            self.log_info(fl_ctx, f"site policy from {self.policy.source}: training curves "
                                  f"{'sent to' if share_curves else 'kept from'} the server, local model "
                                  f"{'shared' if self.policy.share_local_model else 'not shared'} for cross-site "
                                  f"evaluation, results as {getattr(self.result_kind(), 'value', self.result_kind())}")

    # ------------------------------------------------------------------ hooks
    def load_data(self, fl_ctx: FLContext) -> None:
        """Load this site's data into ``self.data`` (and log what was loaded)."""
        raise NotImplementedError

    def place_data(self, device: torch.device, fl_ctx: FLContext) -> None:
        """Move what of ``self.data`` fits onto the training ``device`` (called once the device is known)."""

    def create_trainer(self, model: torch.nn.Module, device: torch.device) -> Any:
        """The local trainer (``fit``, ``optimizer``); algorithms that change the local objective return their own."""
        raise NotImplementedError

    def unpack_train_data(self, dxo: DXO) -> Dict[str, Any]:
        """The global weights in a ``train`` task's DXO (subclasses accept richer payloads)."""
        if dxo.data_kind != DataKind.WEIGHTS:
            raise ValueError(f"train task carries {dxo.data_kind}, expected {DataKind.WEIGHTS}")
        return dxo.data

    def assess_global_model(self, dxo: DXO, global_weights: Dict[str, Any], round_num: int,
                            num_rounds: Optional[int], fl_ctx: FLContext) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Measure the received global model (loaded into ``self.model``) before local training: the metrics that
        select the best model (must include ``key_metric``) and the documented scalars it reports."""
        raise NotImplementedError

    def before_training(self, dxo: DXO, round_num: int, num_rounds: Optional[int], fl_ctx: FLContext) -> None:
        """Called just before local training (learning rate, alignment targets...)."""

    def after_training(self, round_num: int, fl_ctx: FLContext) -> Dict[str, Any]:
        """Called after local training, before the client state is saved (e.g. to train Ditto's personal model);
        returns documented scalars added to the round's report."""
        return {}

    def deployed_weights(self) -> Optional[Dict[str, np.ndarray]]:
        """The model this site submits to cross-site evaluation: its last local model (which carries any
        site-local layers); personalised methods with a separate personal model return that."""
        return self.local_weights

    def local_metrics(self) -> Dict[str, float]:
        """Metrics of the freshly trained local model (must include ``key_metric``; called only when
        ``evaluate_local_model``)."""
        raise NotImplementedError

    def trained_report(self, report: Dict[str, Any], local_metrics: Dict[str, float], losses: Dict[str, float],
                       seconds: float) -> Dict[str, Any]:
        """The documented scalars sent with the local weights, from what :meth:`assess_global_model` reported
        (``local_metrics`` is empty when the local model is not evaluated)."""
        raise NotImplementedError

    def site_local_keys(self) -> set:
        """``state_dict`` keys that never leave the site (e.g. normalisation layers under FedBN): left out of every
        train result, and restored from the site's own last local model into every global model it receives."""
        return set()

    def apply_local_layers(self) -> None:
        """Put this site's own values of :meth:`site_local_keys` into ``self.model`` (once it has trained)."""
        keys = self.site_local_keys()
        if keys and self.local_weights is not None:
            load_weights(self.model, {**weights_to_numpy(self.model),
                                      **{k: self.local_weights[k] for k in keys}}, "the site's local layers")

    def result_meta(self) -> Dict[str, Any]:
        """Further documented meta entries of the train result besides the scalars (e.g. FedDA's feature
        statistics)."""
        return {}

    def _validation_metrics(self) -> Dict[str, float]:
        """Metrics of the current model on this site's evaluation split (must include ``key_metric``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the template
    def _ensure_ready(self, fl_ctx: FLContext) -> None:
        """Seeds and threads, data, device, model and trainer, then the saved client state (once per worker)."""
        if self.trainer is not None:
            return
        threads = configure_torch(self.num_threads, self.seed)
        self.load_data(fl_ctx)
        self.device = resolve_device(self.device_name)
        self.place_data(self.device, fl_ctx)
        self.model = build_model(self.model_name, **self.model_args).to(self.device)
        self.trainer = self.create_trainer(self.model, self.device)
        self.log_info(fl_ctx, f"site '{self.site}' trains on {self.device} ({threads} CPU threads)")
        self._restore_state(fl_ctx)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        """One round: measure the received global model, train locally, keep the state, send weights and report."""
        dxo = from_shareable(shareable)
        rnd = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0))
        n_rounds = shareable.get_header(AppConstants.NUM_ROUNDS, None)
        global_weights = self.unpack_train_data(dxo)
        load_weights(self.model, global_weights, f"global model of round {rnd}")
        self.apply_local_layers()
        global_metrics, report = self.assess_global_model(dxo, global_weights, rnd, n_rounds, fl_ctx)
        for k, v in {**global_metrics, **report}.items():
            self._tb_scalar(f"global_{k}", v, rnd)
        self.before_training(dxo, rnd, n_rounds, fl_ctx)

        def on_epoch_end(epoch: int, losses: Dict[str, float]) -> None:
            self.log_info(fl_ctx, f"round {rnd} epoch {epoch + 1}/{self.local_epochs}: "
                          + " ".join(f"{k}={v:.4f}" for k, v in losses.items()))
            for k, v in losses.items():
                self._tb_scalar(f"train_{k}", v, rnd * self.local_epochs + epoch)

        start = time.time()
        result = self.trainer.fit(self.data.train, self.local_epochs, self.batch_size, seed=self.seed * 1000 + rnd,
                                  should_stop=lambda: abort_signal.triggered, on_epoch_end=on_epoch_end)
        if result.aborted:
            self.log_info(fl_ctx, "training aborted")
            return make_reply(ReturnCode.TASK_ABORTED)
        seconds = time.time() - start
        local = self.local_metrics() if self.evaluate_local_model else {}
        if local:
            self._tb_scalar(f"local_{self.key_metric}", local[self.key_metric], rnd)
        self.local_weights = weights_to_numpy(self.model)
        self.local_round = rnd
        personal = self.after_training(rnd, fl_ctx)
        self._save_state()
        self.log_info(fl_ctx, f"round {rnd}: trained {result.steps} steps in {seconds:.1f}s"
                      + (f", local model {self.key_metric} {local[self.key_metric]:.4f}" if local else ""))
        report = {**self.trained_report(report, local, result.losses, seconds), **personal}
        return self._train_result(len(self.data.train), global_metrics, report, received=global_weights)

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        """Cross-site evaluation: score the model in the task on this site's validation split."""
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        load_weights(self.model, from_shareable(shareable).data, f"model of '{owner}'")
        if str(owner).startswith("SRV_"):  # a global model is deployed here with the site's local layers
            self.apply_local_layers()
        metrics = self._validation_metrics()
        self.log_info(fl_ctx, f"validated model of '{owner}' on '{self.site}': "
                              f"{self.key_metric} {metrics[self.key_metric]:.4f}")
        return DXO(DataKind.METRICS, data=metrics).to_shareable()

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        """Cross-site evaluation: send the model this site deploys (:meth:`deployed_weights`), if its policy shares
        it."""
        if not self.policy.share_local_model:
            self.log_info(fl_ctx, f"not sending the local model for cross-site evaluation: the site policy "
                                  f"({self.policy.source}) does not share it")
            return make_reply(ReturnCode.EMPTY_RESULT)
        deployed = self.deployed_weights()
        if deployed is None:
            self.log_warning(fl_ctx, "no local model to submit: this site has not trained yet")
            return make_reply(ReturnCode.EMPTY_RESULT)
        return DXO(DataKind.WEIGHTS, data={k: np.array(v, copy=True) for k, v in deployed.items()}).to_shareable()

    def result_kind(self) -> str:
        """``WEIGHT_DIFF`` if the job or the site's policy asks for weight differences, else ``WEIGHTS``."""
        diff = self.send_weight_differences or self.policy.send_weight_differences
        return DataKind.WEIGHT_DIFF if diff else DataKind.WEIGHTS

    def _train_result(self, n_train: int, global_metrics: Dict[str, float], report: Dict[str, Any],
                      received: Optional[Dict[str, Any]] = None) -> Shareable:
        """What a site sends after training: its local weights (or, see :meth:`result_kind`, their difference from
        the ``received`` global weights), sample count, the metrics of the received global model (for model
        selection) and the documented scalars in ``report``."""
        local = self.site_local_keys()
        sent = {k: v for k, v in self.local_weights.items() if k not in local}
        if self.result_kind() == DataKind.WEIGHT_DIFF:
            out = DXO(DataKind.WEIGHT_DIFF, data=weight_difference(sent, {k: received[k] for k in sent}))
        else:  # a copy: FLARE's result filters edit the payload in place (ExcludeVars deletes keys)
            out = DXO(DataKind.WEIGHTS, data={k: np.array(v, copy=True) for k, v in sent.items()})
        out.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, n_train)
        out.set_meta_prop(MetaKey.INITIAL_METRICS, global_metrics)
        out.set_meta_prop(SITE_REPORT_KEY, report)
        for key, value in self.result_meta().items():
            out.set_meta_prop(key, value)
        return out.to_shareable()

    def state_dict(self) -> Dict[str, Any]:
        """The client state to keep across worker restarts (tensors and plain values only): the last local weights
        and the optimiser; subclasses add theirs (``state_keys`` lists what a state file must hold)."""
        return {"local_weights": {k: torch.as_tensor(v) for k, v in self.local_weights.items()},
                "optimizer": self.trainer.optimizer.state_dict()}

    def load_state(self, state: Dict[str, Any]) -> str:
        """Apply a state read from the state file; returns what was restored, for the log."""
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.local_weights = {k: v.cpu().numpy() for k, v in state["local_weights"].items()}
        return "local model and optimiser"

    def _save_state(self) -> None:
        torch_save_atomic(self.state_dict(), self._state_path())  # a crash leaves the previous file

    def _restore_state(self, fl_ctx: FLContext) -> None:
        """Restore the state saved by an earlier worker of this job at this site, if any.

        Raises:
            StateError: naming the file and the site, when the file cannot be read or does not fit.
        """
        path = self._state_path()
        state = read_state_file(path, self.site, self.state_keys, self.device)
        if state is None:
            return
        try:
            restored = self.load_state(state)
        except Exception as e:
            raise StateError(f"site '{self.site}': client state file {path} does not fit this site's model or "
                             f"optimiser ({e}); move it away to start this site afresh") from e
        self.log_info(fl_ctx, f"restored client state ({restored}) from {path}")

    def _state_path(self) -> str:
        """Where client state that must outlive a worker process is kept (the job's app folder at this site)."""
        return os.path.join(self._app_dir, self.state_file)

    def _tb_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, float(value), global_step=step)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if not self._ready and self._setup_error is None:
            try:
                self._ensure_ready(fl_ctx)
                self._ready = True
            except ValueError as e:  # DataError, StateError, or settings that do not fit this site's data
                self._setup_error = str(e)
            except Exception as e:  # anything else: the site stays not ready, with the reason in every reply
                self.log_exception(fl_ctx, f"site '{self.site}' could not be prepared: {e}")
                self._setup_error = f"{type(e).__name__}: {e}"
        if self._setup_error is not None:
            # the error reply makes the server stop the job (or carry on without this site, per its policy)
            self.log_error(fl_ctx, f"site '{self.site}' cannot take part: {self._setup_error}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        try:
            if task_name == AppConstants.TASK_TRAIN:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == AppConstants.TASK_VALIDATION:
                return self._validate(shareable, fl_ctx)
            if task_name == AppConstants.TASK_SUBMIT_MODEL:
                return self._submit_model(fl_ctx)
        except Exception as e:
            self.log_exception(fl_ctx, f"site '{self.site}' failed task '{task_name}': {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        self.log_error(fl_ctx, f"unknown task '{task_name}'")
        return make_reply(ReturnCode.TASK_UNKNOWN)
