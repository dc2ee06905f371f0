"""Server workflows: ScatterAndGather with per-round metrics and fairness reporting, the ring relay of FedDA-cyclic,
and cross-site evaluation; all of them check their tasks as often as their ``task_check_period`` says."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from ..algorithms.feature_stats import FeatureStatistics
from ..keys import AGGREGATION_WEIGHTS_KEY, FEATURE_STATS_KEY, PEER_FEATURE_STATS_KEY, PEER_SITE_KEY, SITE_REPORT_KEY
from ..algorithms.relay import encoder_part, relay_assignments
from .resume import (RESUME_FILE, ResumeError, ResumeState, check_resume_fits, load_resume_state, save_resume_state,
                     summary_before)
from ..common.reports import clean_metrics
from ..common.results import RunSummary
from .site_view import site_view


class TaskCheckPeriod:
    """Mixin for FLARE controllers: make the server's task bookkeeping honour the controller's ``task_check_period``.

    FLARE 2.9's ``Controller.set_communicator`` hands the period to the communicator as ``task_check_period``, but
    ``WFCommServer`` sleeps ``_task_check_period`` (set to 0.2 s in its constructor) in both its task monitor and
    ``wait_for_task``, so the controller's setting never takes effect: a round's last result waits 0.2-0.4 s before
    the workflow sees the round done. This sets the attribute the communicator actually reads.
    """

    def set_communicator(self, communicator: Any) -> None:
        super().set_communicator(communicator)
        if hasattr(communicator, "_task_check_period"):
            communicator._task_check_period = self._task_check_period


class CrossSiteEvaluation(TaskCheckPeriod, CrossSiteModelEval):
    """FLARE's ``CrossSiteModelEval`` with :class:`TaskCheckPeriod` (same arguments)."""


def too_few_sites_message(min_clients: int, connected: Sequence[str]) -> str:
    """What to tell a user whose run has fewer sites than the job's federation ("" if it has enough).

    Each round then ends once every connected site has answered, so the job runs as a smaller federation. FLARE's
    job scheduler starts a POC or production job only once ``min_clients`` sites are connected, so this happens in
    the simulator run with fewer ``-n`` sites (with no ``-n`` at all it starts two)."""
    if len(connected) >= min_clients:
        return ""
    return (f"this job's federation is {min_clients} sites (min_clients) but {len(connected)} are connected "
            f"({', '.join(sorted(connected)) or 'none'}): training the {len(connected)} as a smaller federation; "
            f"for the job's own federation run the simulator with -n {min_clients} -t {min_clients}")


class MetricsScatterAndGather(TaskCheckPeriod, ScatterAndGather):
    """FedAvg-style ScatterAndGather that logs, every round, each site's Dice of the global model it received
    and the fairness summary of those numbers (mean, worst site, std, max-min gap, Jain's index).

    The numbers go to the server log, to TensorBoard (``<run dir>/tb_events/server``) and to the run summary
    (``<run dir>/metrics/``, see :mod:`medflare.common.results`). All arguments are those of ``ScatterAndGather`` plus:

    Args:
        key_metric: the metric the sites report for model selection and fairness (``"dice"``).
        resume_from: a resume checkpoint (``medflare_resume.pt`` of an interrupted run; absolute, or relative to the
            server's app folder) to continue from: the job starts at the checkpoint's next round with its global
            model, fairness state, relay encoders, server optimiser state and run summary (see
            :mod:`medflare.flare.resume`). Empty: start afresh.
        keep_resume_checkpoint: write ``<app folder>/medflare_resume.pt`` at the end of every round.

    ``wait_time_after_min_received`` defaults to 600 s: once ``min_clients`` sites have answered, a round still waits
    (up to that long) for every other site that received the task. With 0, a round closes on the first
    ``min_clients`` answers, so which sites are averaged depends on their speed: results stop being reproducible and
    a slow site (e.g. the one that also evaluates global test sets) can miss every round. Lower it for federations
    where a dead site should cost less time.
    """

    def __init__(self, *args: Any, key_metric: str = "dice", resume_from: str = "",
                 keep_resume_checkpoint: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("wait_time_after_min_received", 600)
        super().__init__(*args, **kwargs)
        self.key_metric = key_metric
        self.resume_from = resume_from
        self.keep_resume_checkpoint = keep_resume_checkpoint
        self._app_dir = ""
        self._site_metrics: Dict[str, Dict[str, Any]] = {}
        self._summary: Optional[RunSummary] = None
        self._tb = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        shortfall = too_few_sites_message(self._min_clients, [c.name for c in fl_ctx.get_engine().get_clients()])
        if shortfall:
            self.log_warning(fl_ctx, shortfall)
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self._summary = RunSummary(run_dir, self.key_metric)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb_events", "server"))
        except ImportError:  # TensorBoard is optional for the server's own curves
            self.log_warning(fl_ctx, "tensorboard is not installed; server curves are written to metrics/ only")
        self._app_dir = fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id())
        if self.resume_from:
            path = os.path.join(self._app_dir, os.path.expanduser(self.resume_from))
            try:
                state = load_resume_state(path)
                model = (self._global_weights or {}).get(ModelLearnableKey.WEIGHTS) or {}
                check_resume_fits(state, path, model, self._start_round + self._num_rounds)
                self.restore_resume_state(state, fl_ctx)
            except ResumeError as e:
                self.system_panic(f"cannot resume: {e}", fl_ctx)
                return
            self.log_info(fl_ctx, f"resumed from {path}: continuing with round {state.next_round} of "
                                  f"{self._start_round + self._num_rounds}")

    def resume_state(self) -> ResumeState:
        """What a resumed job needs to continue after the round that just finished."""
        weights = self._global_weights[ModelLearnableKey.WEIGHTS]
        server_opt = getattr(self.shareable_gen, "resume_state", None)
        return ResumeState(next_round=self._current_round + 1, num_rounds=self._start_round + self._num_rounds,
                           weights=dict(weights), meta=dict(self._global_weights.get(ModelLearnableKey.META) or {}),
                           server_optimizer=server_opt() if server_opt else None,
                           summary=self._summary.data if self._summary is not None else None)

    def restore_resume_state(self, state: ResumeState, fl_ctx: FLContext) -> None:
        """Continue from ``state``: global model and meta, round, server optimiser, run summary."""
        load_opt = getattr(self.shareable_gen, "load_resume_state", None)
        if (state.server_optimizer is None) != (load_opt is None):
            raise ResumeError("the checkpoint and this job differ in their server optimiser (shareable_generator); "
                              "resume with the job that wrote the checkpoint")
        if load_opt is not None:
            load_opt(state.server_optimizer)
        self._global_weights = make_model_learnable(state.weights, state.meta)
        fl_ctx.set_prop(AppConstants.GLOBAL_MODEL, self._global_weights, private=True, sticky=True)
        self._current_round = state.next_round
        if self._summary is not None and state.summary is not None:
            self._summary.data = summary_before(state.summary, state.next_round)
            self._summary.save()

    def _save_resume_state(self, fl_ctx: FLContext) -> None:
        if not self.keep_resume_checkpoint or not self._app_dir:
            return
        try:
            save_resume_state(os.path.join(self._app_dir, RESUME_FILE), self.resume_state())
        except Exception as e:  # losing the resume point must not stop the training
            self.log_exception(fl_ctx, f"round {self._current_round}: could not write the resume checkpoint: {e}")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        if result.get_return_code(ReturnCode.OK) == ReturnCode.OK and not is_unknown_task:
            try:
                dxo = from_shareable(result)
                # out-of-range or non-finite metrics are dropped before model selection or the summary see them
                initial, notes = clean_metrics(client_name, dxo.get_meta_prop(MetaKey.INITIAL_METRICS))
                report, more = clean_metrics(client_name, dxo.get_meta_prop(SITE_REPORT_KEY))
                for note in notes + more:
                    self.log_warning(fl_ctx, note)
                if notes:
                    dxo.set_meta_prop(MetaKey.INITIAL_METRICS, initial)
                    dxo.update_shareable(result)
                self._site_metrics[client_name] = {**initial, **report}
            except Exception as e:  # a malformed result is rejected (with its reason) by the aggregator
                self.log_warning(fl_ctx, f"no metrics in the result of site '{client_name}': {e}")
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_DONE:
            try:
                self._report_round(fl_ctx)
            except Exception as e:  # the report is for people: it never stops the round or the relay
                self.log_exception(fl_ctx, f"round {self._current_round}: the round report failed: {e}")
            self._save_resume_state(fl_ctx)
        elif event_type == AppEventType.ROUND_STARTED:
            self._site_metrics = {}
        elif event_type == EventType.BEFORE_TASK_DATA_FILTER:
            self._restrict_task_meta(fl_ctx)

    def site_train_task(self, fl_ctx: FLContext) -> Optional[Tuple[str, Shareable]]:
        """At ``BEFORE_TASK_DATA_FILTER``: the site and its own copy of the train task about to be sent to it, or
        ``None`` for any other task. FLARE gives every site its own copy of a task right before this event, so
        changing the copy's content changes nothing for the other sites."""
        if fl_ctx.get_prop(FLContextKey.TASK_NAME) != self.train_task_name:
            return None
        task_data = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else None
        return (site, task_data) if isinstance(task_data, Shareable) and site else None

    def _restrict_task_meta(self, fl_ctx: FLContext) -> None:
        """Each site receives only its own entries of the global model's meta (see :mod:`medflare.flare.site_view`)."""
        bound = self.site_train_task(fl_ctx)
        if bound is not None:
            site_view(bound[1], bound[0])

    def _report_round(self, fl_ctx: FLContext) -> None:
        if self._summary is None or not self._site_metrics:
            return
        rnd = self._current_round
        meta = (self._global_weights or {}).get(ModelLearnableKey.META) or {}
        entry = self._summary.add_round(rnd, self._site_metrics, meta.get(AGGREGATION_WEIGHTS_KEY))
        per_site = ", ".join(f"{s}={m.get(self.key_metric, float('nan')):.4f}" for s, m in entry["sites"].items())
        self.log_info(fl_ctx, f"round {rnd}/{self._num_rounds - 1}: {self.key_metric} of the global model "
                              f"per site: {per_site}")
        fair = entry["fairness"]
        if fair:
            self.log_info(fl_ctx, f"round {rnd} fairness: mean={fair['mean']:.4f} worst={fair['worst']:.4f} "
                                  f"({fair['worst_site']}) std={fair['std']:.4f} gap={fair['gap']:.4f}")
        if self._tb is not None:
            for site, metrics in entry["sites"].items():
                if self.key_metric in metrics:
                    self._tb.add_scalar(f"global_{self.key_metric}/{site}", metrics[self.key_metric], rnd)
            if fair:
                for k in ("mean", "worst", "std", "gap", "jain"):
                    self._tb.add_scalar(f"fairness/{k}", fair[k], rnd)
            self._tb.flush()

    def stop_controller(self, fl_ctx: FLContext) -> None:
        super().stop_controller(fl_ctx)
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class RingRelayScatterAndGather(MetricsScatterAndGather):
    """:class:`MetricsScatterAndGather` that also relays encoders around a ring of sites (FedDA-cyclic).

    In each round site i receives, with the global model, the encoder that its ring neighbour (the previous site in
    name order) trained in the previous round (see :mod:`medflare.algorithms.relay`). The train task is broadcast as
    in FedAvg (so the quorum, ``wait_time_after_min_received`` and a dead site are handled by ScatterAndGather
    itself); at ``BEFORE_TASK_DATA_FILTER``, when FLARE holds each site's own copy of the task, that copy becomes a
    ``COLLECTION`` DXO ``{"global": <global weights>, "peer_encoder": <peer's encoder weights>}`` with meta
    ``peer_site``. In the first round there is nothing to relay and the plain global model goes out.

    The persistor's model must expose ``encoder_keys()`` (e.g. :class:`medflare.segmentation.networks.FeatureUNet`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoders: Dict[str, Dict[str, Any]] = {}
        self._incoming: Dict[str, Dict[str, Any]] = {}
        self._peers: Dict[str, Optional[str]] = {}
        self._encoder_keys: Optional[set] = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        model = getattr(self.persistor, "model", None)
        if not hasattr(model, "encoder_keys"):
            self.system_panic("the ring relay needs a persistor whose model exposes encoder_keys()", fl_ctx)
            return
        self._encoder_keys = model.encoder_keys()

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        if accepted and not is_unknown_task:
            # the site's full model as the aggregator accepted it (weight differences and partial updates resolved)
            accepted_weights = getattr(self.aggregator, "accepted_weights", None)
            weights = accepted_weights(client_name, fl_ctx) if accepted_weights else None
            self._incoming[client_name] = encoder_part(weights or from_shareable(result).data, self._encoder_keys)
        return accepted

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_DONE:  # first: nothing in the round's report may keep stale encoders
            self._encoders, self._incoming = self._incoming, {}
        elif event_type == AppEventType.ROUND_STARTED:
            self._assign_peers(fl_ctx)
        elif event_type == EventType.BEFORE_TASK_DATA_FILTER:  # before the site view restricts the copy's meta
            self._add_peer_encoder(fl_ctx)
        super().handle_event(event_type, fl_ctx)

    def _assign_peers(self, fl_ctx: FLContext) -> None:
        """This round's relay: which peer's encoder each connected site receives (none in the first round)."""
        self._peers = {}
        if not self._encoders:
            return
        clients = [c if isinstance(c, str) else c.name for c in self._engine.get_clients()]
        self._peers = relay_assignments(clients, self._encoders)
        self.log_info(fl_ctx, f"round {self._current_round} relay (site <- encoder of): "
                              + ", ".join(f"{s} <- {p or 'global'}" for s, p in sorted(self._peers.items())))

    def _add_peer_encoder(self, fl_ctx: FLContext) -> None:
        """Turn one site's copy of the train task into the global model plus its peer's encoder."""
        bound = self.site_train_task(fl_ctx) if self._encoders else None
        if bound is None:
            return
        site, task_data = bound
        if site not in self._peers:  # a site that connected after the round started
            self._peers[site] = relay_assignments([site, *self._peers], self._encoders)[site]
        peer = self._peers[site]
        if peer is None:
            return
        collection = DXO(DataKind.COLLECTION,
                         data={"global": from_shareable(task_data),
                               "peer_encoder": DXO(DataKind.WEIGHTS, self._encoders[peer])},
                         meta={PEER_SITE_KEY: peer})
        collection.update_shareable(task_data)

    def resume_state(self) -> ResumeState:
        """The resume checkpoint also keeps the encoders to relay in the next round."""
        state = super().resume_state()
        state.relay_encoders = dict(self._encoders)
        return state

    def restore_resume_state(self, state: ResumeState, fl_ctx: FLContext) -> None:
        super().restore_resume_state(state, fl_ctx)
        self._encoders = dict(state.relay_encoders)


class StatisticsRelayScatterAndGather(MetricsScatterAndGather):
    """:class:`MetricsScatterAndGather` that relays the sites' feature statistics (FedDA's statistics mode).

    Each site's train result may carry ``medflare_feature_stats`` (per-class means and variances of its encoder
    features, see :mod:`medflare.algorithms.feature_stats`). The controller checks them (malformed or non-finite
    statistics are dropped with a warning naming the site) and, in the next round, adds to each site's copy of the train
    task the statistics of every *other* site (meta ``medflare_peer_feature_stats``). In the first round, and in the
    first round after a resume, there is nothing to relay and the sites train without alignment.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stats: Dict[str, Dict[str, Any]] = {}
        self._incoming_stats: Dict[str, Dict[str, Any]] = {}

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        accepted = super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        if accepted and not is_unknown_task:
            report = from_shareable(result).get_meta_prop(FEATURE_STATS_KEY)
            if report is not None:
                try:
                    FeatureStatistics.from_report(report, f"site '{client_name}'")
                    self._incoming_stats[client_name] = report
                except ValueError as e:
                    self.log_warning(fl_ctx, f"round {self._current_round}: not relaying {e}")
        return accepted

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == AppEventType.ROUND_DONE:
            self._stats, self._incoming_stats = self._incoming_stats, {}
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.BEFORE_TASK_DATA_FILTER:
            self._add_peer_statistics(fl_ctx)

    def _add_peer_statistics(self, fl_ctx: FLContext) -> None:
        """Add the other sites' feature statistics to one site's copy of the train task."""
        bound = self.site_train_task(fl_ctx) if self._stats else None
        if bound is None:
            return
        site, task_data = bound
        dxo = from_shareable(task_data)
        dxo.set_meta_prop(PEER_FEATURE_STATS_KEY, {s: v for s, v in self._stats.items() if s != site})
        dxo.update_shareable(task_data)
