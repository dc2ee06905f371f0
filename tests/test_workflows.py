"""Server workflows: the controllers' task-check period reaches the communicator that uses it."""

from __future__ import annotations

import pytest
from nvflare.apis.impl.wf_comm_server import WFCommServer

from medflare.flare.fairness_workflow import FairnessScatterAndGather
from medflare.flare.workflows import CrossSiteEvaluation, MetricsScatterAndGather, RingRelayScatterAndGather

IDS = {"aggregator_id": "aggregator", "persistor_id": "persistor", "shareable_generator_id": "shareable_generator"}


@pytest.mark.parametrize("make", [
    lambda: MetricsScatterAndGather(min_clients=3, num_rounds=2, task_check_period=0.05, **IDS),
    lambda: FairnessScatterAndGather(min_clients=3, num_rounds=2, task_check_period=0.05, **IDS),
    lambda: RingRelayScatterAndGather(min_clients=3, num_rounds=2, task_check_period=0.05, **IDS),
    lambda: CrossSiteEvaluation(task_check_period=0.05, model_locator_id="model_locator")])
def test_task_check_period_is_the_one_the_communicator_sleeps(make):
    communicator = WFCommServer()
    assert communicator._task_check_period == 0.2  # FLARE's own period, whatever the controller says
    make().set_communicator(communicator)
    assert communicator._task_check_period == 0.05
