"""Aggregation arithmetic and the FLARE aggregator that applies it."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from medflare.algorithms.aggregation import UpdateError, check_update, sample_weights, weighted_average
from medflare.flare.aggregators import AGGREGATION_WEIGHTS_KEY, WeightedAggregator


def test_sample_weights():
    assert sample_weights({"a": 100, "b": 300}) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ValueError):
        sample_weights({"a": 0})


def test_weighted_average_by_hand():
    updates = {"a": {"w": np.array([1.0, 2.0], np.float32), "n": np.array(2)},
               "b": {"w": np.array([3.0, 6.0], np.float32), "n": np.array(5)}}
    out = weighted_average(updates, {"a": 1.0, "b": 3.0})  # normalised to 0.25 / 0.75
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    assert out["w"].dtype == np.float32
    assert out["n"] == 4 and out["n"].dtype == updates["a"]["n"].dtype  # 0.25*2 + 0.75*5 = 4.25 -> 4
    with pytest.raises(ValueError):
        weighted_average(updates, {"a": 1.0})


def test_fedavg_equals_pooled_mean_of_equal_sized_sites():
    rs = np.random.RandomState(0)
    ups = {s: {"w": rs.normal(size=(3, 4))} for s in "abc"}
    out = weighted_average(ups, sample_weights({"a": 10, "b": 10, "c": 10}))
    np.testing.assert_allclose(out["w"], np.mean([ups[s]["w"] for s in "abc"], axis=0))


def test_check_update():
    ref = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    check_update("a", {"w": np.ones((2, 2)), "b": np.ones(2)}, ref)
    with pytest.raises(UpdateError, match=r"site 'a': parameter 'w' contains NaN"):
        check_update("a", {"w": np.full((2, 2), np.nan), "b": np.ones(2)}, ref)
    with pytest.raises(UpdateError, match=r"site 'a': parameter 'b' has shape \(3,\)"):
        check_update("a", {"w": np.ones((2, 2)), "b": np.ones(3)}, ref)
    with pytest.raises(UpdateError, match=r"missing \['b'\]"):
        check_update("a", {"w": np.ones((2, 2))}, ref)


# ---------------------------------------------------------------- FLARE glue


def _ctx(round_num=0, global_weights=None):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=False)
    if global_weights is not None:
        ctx.set_prop(AppConstants.GLOBAL_MODEL, make_model_learnable(global_weights, {}), private=True, sticky=False)
    return ctx


def _result(site, weights, n, round_num=0):
    dxo = DXO(DataKind.WEIGHTS, data=weights)
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, n)
    s = dxo.to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return s


class PanicRecorder(WeightedAggregator):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.panics = []

    def system_panic(self, reason, fl_ctx):
        self.panics.append(reason)


def test_aggregator_sample_weighted():
    agg = PanicRecorder()
    ctx = _ctx(0, {"w": np.zeros(2)})
    assert agg.accept(_result("site-1", {"w": np.array([1.0, 1.0])}, 10), ctx)
    assert agg.accept(_result("site-2", {"w": np.array([4.0, 0.0])}, 30), ctx)
    assert not agg.accept(_result("site-2", {"w": np.array([9.0, 9.0])}, 30), ctx)  # repeat
    assert not agg.accept(_result("site-3", {"w": np.array([9.0, 9.0])}, 30, round_num=5), ctx)  # late
    out = from_shareable(agg.aggregate(ctx))
    np.testing.assert_allclose(out.data["w"], [3.25, 0.25])
    assert out.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == {"site-1": 0.25, "site-2": 0.75}
    assert not agg.panics
    agg.reset(ctx)
    assert agg.updates == {}


def test_aggregator_rejects_nan_update_naming_site():
    agg = PanicRecorder()
    ctx = _ctx(0, {"w": np.zeros(2)})
    assert not agg.accept(_result("site-2", {"w": np.array([np.nan, 1.0])}, 10), ctx)
    assert len(agg.panics) == 1 and "site 'site-2'" in agg.panics[0] and "NaN" in agg.panics[0]


def test_aggregator_skip_mode_aggregates_the_rest():
    agg = PanicRecorder(on_invalid_update="skip")
    ctx = _ctx(0, {"w": np.zeros(2)})
    assert agg.accept(_result("site-1", {"w": np.array([1.0, 2.0])}, 10), ctx)
    assert not agg.accept(_result("site-2", {"w": np.array([1.0, 2.0, 3.0])}, 10), ctx)
    assert not agg.accept(_result("site-3", {"w": np.array([1.0, 2.0])}, 0), ctx)  # no samples
    np.testing.assert_allclose(from_shareable(agg.aggregate(ctx)).data["w"], [1.0, 2.0])
    assert not agg.panics


def test_aggregator_ignores_error_replies():
    agg = PanicRecorder()
    reply = Shareable()
    reply.set_return_code(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_peer_props({ReservedKey.IDENTITY_NAME: "site-1"})
    assert not agg.accept(reply, _ctx())
    agg.aggregate(_ctx())
    assert agg.panics and "no valid site update" in agg.panics[0]
