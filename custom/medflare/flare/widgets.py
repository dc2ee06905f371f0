"""Server widgets: the cross-site evaluation report."""

from __future__ import annotations

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.widgets.validation_json_generator import ValidationJsonGenerator

from ..common.reports import clean_cross_site
from ..common.results import RunSummary, format_matrix


class CrossSiteReport(ValidationJsonGenerator):
    """Writes FLARE's ``cross_site_val/cross_val_results.json`` and, from the same results, the site-by-model
    Dice matrix ``metrics/cross_site_dice.csv`` plus its summary in ``metrics/metrics_summary.json``.

    Args:
        key_metric: metric of the matrix (``"dice"``).
    """

    def __init__(self, key_metric: str = "dice", **kwargs) -> None:
        super().__init__(**kwargs)
        self.key_metric = key_metric

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN and self._val_results:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            results, notes = clean_cross_site(self._val_results)  # out-of-range scores never enter the matrix
            for note in notes:
                self.log_warning(fl_ctx, note)
            cross = RunSummary(run_dir, self.key_metric).set_cross_site(results)
            self.log_info(fl_ctx, f"cross-site {self.key_metric} (rows: models, columns: sites):\n"
                                  + format_matrix(cross["matrix"]))
