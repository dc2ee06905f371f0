"""Plumbing shared by medflare's FLARE executors: site identity, task dispatch, setup errors, client state path."""

from __future__ import annotations

import os
from typing import Optional

from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

STATE_FILE = "medflare_client_state.pt"


class SiteExecutor(Executor):
    """Base of the medflare executors.

    It learns the site's name, app folder and ``local/`` folder at ``START_RUN``, prepares the site lazily on the
    first task (subclasses implement ``_ensure_ready``; a ``ValueError`` there, such as a
    :class:`~medflare.data.DataError`, makes every task of this site fail with the message, which lets the server stop
    the job), and dispatches ``train``, ``validate`` and ``submit_model`` to ``_train``, ``_validate`` and
    ``_submit_model``. Any other exception in a task is logged and returned as ``EXECUTION_EXCEPTION``.

    Args:
        tb_writer_id: id of the client's ``TBWriter`` component ("" disables TensorBoard).
    """

    state_file = STATE_FILE

    def __init__(self, tb_writer_id: str = "tb_writer") -> None:
        super().__init__()
        self.tb_writer_id = tb_writer_id
        self.site: str = ""
        self._app_dir = ""
        self._local_dir: Optional[str] = None
        self._tb = None
        self._setup_error: Optional[str] = None

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            self.site = fl_ctx.get_identity_name()
            engine = fl_ctx.get_engine()
            workspace = engine.get_workspace()
            self._app_dir = workspace.get_app_dir(fl_ctx.get_job_id())
            self._local_dir = workspace.get_site_config_dir()
            self._tb = engine.get_component(self.tb_writer_id) if self.tb_writer_id else None

    def _ensure_ready(self, fl_ctx: FLContext) -> None:
        raise NotImplementedError

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        raise NotImplementedError

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        raise NotImplementedError

    def _submit_model(self, fl_ctx: FLContext) -> Shareable:
        raise NotImplementedError

    def _state_path(self) -> str:
        """Where client state that must outlive a worker process is kept (the job's app folder at this site)."""
        return os.path.join(self._app_dir, self.state_file)

    def _tb_scalar(self, tag: str, value: float, step: int) -> None:
        if self._tb is not None:
            self._tb.add_scalar(tag, float(value), global_step=step)

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self._setup_error is None:
            try:
                self._ensure_ready(fl_ctx)
            except ValueError as e:  # DataError, or settings that do not fit this site's data
                self._setup_error = str(e)
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
