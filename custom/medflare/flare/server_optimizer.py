"""Server-side optimisation (FedAvgM, FedAdam) with FLARE's own FedOpt shareable generator.

FLARE's :class:`~nvflare.app_opt.pt.fedopt.PTFedOptModelShareableGenerator` applies the averaged client update
(a ``WEIGHT_DIFF``) as a negative gradient to a server-side torch model, through any torch optimiser. It needs that
model as a component; :class:`ServerOptimizer` takes it from the job's persistor instead, so the server model
starts from exactly the persistor's (seeded) initial weights and the job names its network once.

Pair it with ``WeightedAggregator(output="weight_diff")``. FedAvgM with server learning rate 1 and momentum ``m``::

    {"id": "shareable_generator", "path": "medflare.flare.server_optimizer.ServerOptimizer",
     "args": {"optimizer_args": {"path": "medflare.flare.server_optimizer.SGD", "args": {"lr": 1.0, "momentum": 0.5},
                                 "config_type": "dict"}}}

``medflare.flare.server_optimizer.SGD`` and ``medflare.flare.server_optimizer.Adam`` are torch's optimisers under a
``medflare.`` path: FLARE builds the optimiser from its path, and a site whose class allow-list admits only
``medflare.`` (the templates' default, and the only choice for jobs that run on site-installed code) refuses
``torch.optim.*``.
"""

from __future__ import annotations

import copy
from typing import Any, Dict

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.fedopt import PTFedOptModelShareableGenerator
from torch.optim import SGD, Adam

__all__ = ["Adam", "SGD", "ServerOptimizer"]


class ServerOptimizer(PTFedOptModelShareableGenerator):
    """FLARE's FedOpt generator whose server model is a copy of the persistor's model.

    Args:
        persistor_id: id of the persistor component; its ``model`` attribute (a ``torch.nn.Module``) is copied at
            the start of the run.
        **kwargs: :class:`PTFedOptModelShareableGenerator` arguments (``optimizer_args``, ``lr_scheduler_args``,
            ``device``; default device: CPU, which keeps results identical with and without a GPU on the server).

    The server optimiser's state (e.g. momentum) is part of the server's resume checkpoint (:meth:`resume_state`,
    :mod:`medflare.flare.resume`), so a job resumed after a server crash continues with it.
    """

    def __init__(self, persistor_id: str = "persistor", device: str = "cpu", **kwargs: Any) -> None:
        super().__init__(source_model=None, device=device, **kwargs)
        self.persistor_id = persistor_id

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type == EventType.START_RUN:
            persistor = fl_ctx.get_engine().get_component(self.persistor_id)
            model = getattr(persistor, "model", None)
            if model is None:
                self.system_panic(f"component '{self.persistor_id}' has no 'model' for the server optimiser", fl_ctx)
                return
            self.source_model = copy.deepcopy(model)
        super().handle_event(event_type, fl_ctx)

    def resume_state(self) -> Dict[str, Any]:
        """The server model's weights and the optimiser's (and learning-rate scheduler's) state."""
        return {"model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None}

    def load_resume_state(self, state: Dict[str, Any]) -> None:
        """Continue from :meth:`resume_state` of an earlier run of the same job."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
