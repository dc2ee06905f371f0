"""ScatterAndGather controller that reports per-site metrics and their fairness summary every round."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

from .aggregators import AGGREGATION_WEIGHTS_KEY
from .results import RunSummary

SITE_REPORT_KEY = "medflare_report"


class MetricsScatterAndGather(ScatterAndGather):
    """FedAvg-style ScatterAndGather that logs, every round, each site's Dice of the global model it received
    and the fairness summary of those numbers (mean, worst site, std, max-min gap, Jain's index).

    The numbers go to the server log, to TensorBoard (``<run dir>/tb_events/server``) and to the run summary
    (``<run dir>/metrics/``, see :mod:`medflare.results`). All arguments are those of ``ScatterAndGather`` plus:

    Args:
        key_metric: the metric the sites report for model selection and fairness (``"dice"``).
    """

    def __init__(self, *args: Any, key_metric: str = "dice", **kwargs: Any) -> None:
        kwargs.setdefault("wait_time_after_min_received", 0)
        super().__init__(*args, **kwargs)
        self.key_metric = key_metric
        self._site_metrics: Dict[str, Dict[str, Any]] = {}
        self._summary: Optional[RunSummary] = None
        self._tb = None

    def start_controller(self, fl_ctx: FLContext) -> None:
        super().start_controller(fl_ctx)
        run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
        self._summary = RunSummary(run_dir, self.key_metric)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tb_events", "server"))
        except ImportError:  # TensorBoard is optional for the server's own curves
            self.log_warning(fl_ctx, "tensorboard is not installed; server curves are written to metrics/ only")

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        if result.get_return_code(ReturnCode.OK) == ReturnCode.OK and not is_unknown_task:
            try:
                dxo = from_shareable(result)
                metrics = dict(dxo.get_meta_prop(MetaKey.INITIAL_METRICS) or {})
                metrics.update(dxo.get_meta_prop(SITE_REPORT_KEY) or {})
                self._site_metrics[client_name] = metrics
            except Exception as e:  # a malformed result is rejected (with its reason) by the aggregator
                self.log_warning(fl_ctx, f"no metrics in the result of site '{client_name}': {e}")
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == AppEventType.ROUND_DONE:
            self._report_round(fl_ctx)
        elif event_type == AppEventType.ROUND_STARTED:
            self._site_metrics = {}

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
