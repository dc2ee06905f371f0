"""The classification executor's report: every statistic each fairness rule reads, from public constructors only."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare import keys
from medflare.flare.executors import ClassificationExecutor
from medflare.networks import build_model
from medflare.algorithms.sam import fedism_plus_rho

TINY = {"synthetic": {"n_train": 16, "n_val": 8, "n_test": 8, "seed": 0}, "batch_size": 8, "global_test_sites": [],
        "model": {"name": "tiny_cnn"}, "num_threads": 1}
ROUNDS = 4


def site(tmp_path, **args) -> ClassificationExecutor:
    """An executor taking part as site-1, keeping its state in ``tmp_path`` (no FLARE engine needed)."""
    ex = ClassificationExecutor(**{**TINY, **args})
    ex.start("site-1", str(tmp_path))
    return ex


def global_weights():
    return {k: v.numpy() for k, v in build_model("tiny_cnn", in_channels=1, num_classes=4).state_dict().items()}


def train(ex, round_num, meta=None):
    """One train task; returns the site's report."""
    task = DXO(DataKind.WEIGHTS, data=global_weights(), meta=meta or {}).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, round_num)
    task.set_header(AppConstants.NUM_ROUNDS, ROUNDS)
    result = ex.execute(AppConstants.TASK_TRAIN, task, FLContext(), Signal())
    assert result.get_return_code(ReturnCode.OK) == ReturnCode.OK
    return from_shareable(result).get_meta_prop(keys.SITE_REPORT_KEY)


def test_every_site_reports_the_loss_and_balanced_accuracy_of_the_global_model(tmp_path):
    """AFL and q-FedAvg read the loss, FairFed the balanced accuracy, on the site's training set."""
    report = train(site(tmp_path, reports=[]), 0)
    assert report[keys.LOSS_GLOBAL] > 0 and 0.0 <= report[keys.BACC_GLOBAL_TRAIN] <= 1.0
    assert report["n_train"] == 16 and report["n_val"] == 8
    assert not {keys.SHARPNESS, keys.LOSS_PREV_LOCAL, keys.FEDCE_MINUS_SCORE} & set(report)


def test_fedism_sharpness_and_the_fedism_plus_radius(tmp_path):
    report = train(site(tmp_path / "a", optimizer="gsam", reports=["sharpness"]), 0)
    assert np.isfinite(report[keys.SHARPNESS]) and report["rho"] == pytest.approx(0.05)
    plus = train(site(tmp_path / "b", optimizer="gsam", reports=["sharpness"], rho_schedule_p=0.5), 1)
    assert plus["rho"] == pytest.approx(fedism_plus_rho(0.05, 1, ROUNDS, 0.5))
    assert keys.SHARPNESS in plus


def test_fedga_gap_from_the_previous_local_model_also_after_a_restart(tmp_path):
    ex = site(tmp_path, reports=["prev_local"])
    assert keys.LOSS_PREV_LOCAL not in train(ex, 0)  # no local model yet
    report = train(ex, 1)
    assert report[keys.PREV_LOCAL_ROUND] == 0 and report[keys.LOSS_PREV_LOCAL] > 0
    restarted = site(tmp_path, reports=["prev_local"])  # a new worker process on the same app folder
    assert train(restarted, 2)[keys.PREV_LOCAL_ROUND] == 1
    assert restarted.local_round == 2
    assert keys.LOSS_PREV_LOCAL not in train(site(tmp_path / "other", reports=["prev_local"]), 5)


def test_fedce_minus_model_score_needs_the_sites_own_weight(tmp_path):
    ex = site(tmp_path, reports=["minus_model"])
    train(ex, 0)
    assert keys.FEDCE_MINUS_SCORE not in train(ex, 1)  # the server sent no weight for this site
    report = train(ex, 2, {keys.SITE_WEIGHT_KEY: 0.3})
    assert 0.0 <= report[keys.FEDCE_MINUS_SCORE] <= 1.0
    assert keys.FEDCE_MINUS_SCORE not in train(ex, 3, {keys.SITE_WEIGHT_KEY: 1.0})  # no minus model at weight 1


def test_constructor_refuses_unknown_reports_and_optimisers():
    with pytest.raises(ValueError, match="unknown reports"):
        ClassificationExecutor(reports=["sharpnes"])
    with pytest.raises(ValueError, match="optimizer"):
        ClassificationExecutor(optimizer="sgd")
