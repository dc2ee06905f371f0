"""Bounded client reports: every number a site sends that the server uses is checked (type, finite, range) with an
error naming the site; sample counts cannot buy weight; the robust rule bounds what one site can do to the model;
partial updates and weight differences (FLARE's privacy filters) are aggregated; each site sees only its own
entries of the server's bookkeeping."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from medflare.flare import fairness_aggregators as fa
from medflare import keys
from medflare.algorithms.aggregation import UpdateError, check_update, to_weights, weighted_average
from medflare.flare.aggregators import WeightedAggregator
from medflare.keys import AGGREGATION_WEIGHTS_KEY, SITE_REPORT_KEY, SITE_WEIGHT_KEY
from medflare.common.reports import (MAX_LOSS, ReportError, bound_for, check_sample_count, check_statistics,
                                     clean_cross_site, clean_metrics, effective_sample_counts)
from medflare.algorithms.robust import RobustRule, robust_average, update_norm
from medflare.flare.site_view import site_meta, site_view
from test_fairness_aggregators import _ctx, initial_model, make, run_round, site_results

FIVE = ["site-1", "site-2", "site-3", "site-4", "site-5"]


def _result(site, weights, n=32, report=None, round_num=0, kind=DataKind.WEIGHTS):
    dxo = DXO(kind, data=weights)
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, n)
    if report is not None:
        dxo.set_meta_prop(SITE_REPORT_KEY, report)
    s = dxo.to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return s


def _model(w=(0.0, 0.0, 0.0)):
    return make_model_learnable({"w": np.array(w, np.float32), "n": np.array(0, np.int64)}, {})


def _aggregate(agg, results, model=None, round_num=0):
    ctx = _ctx(round_num, model or _model())
    accepted = {site: agg.accept(_result(site, *args, round_num=round_num), ctx) for site, args in results.items()}
    return accepted, agg.aggregate(ctx)


# --------------------------------------------------------------------------------------------------- sample counts
def test_sample_count_claim_is_capped_at_ten_times_the_median():
    agg = make(WeightedAggregator)
    honest = {s: ({"w": np.ones(3, np.float32), "n": np.array(1)}, 100) for s in FIVE[:4]}
    _, out = _aggregate(agg, {**honest, "site-5": ({"w": np.full(3, 5.0, np.float32), "n": np.array(1)}, 10 ** 9)})
    weights = from_shareable(out).get_meta_prop(AGGREGATION_WEIGHTS_KEY)
    assert weights["site-5"] == pytest.approx(1000 / 1400)  # not 0.9999996
    assert not agg.panics


def test_declared_sample_counts_decide_the_weight():
    counts, notes = effective_sample_counts({"a": 10 ** 9, "b": 100}, declared={"a": 100, "b": 100})
    assert counts == {"a": 100.0, "b": 100.0} and "site 'a'" in notes[0]
    with pytest.raises(ReportError, match="site 'c' has no declared sample count"):
        effective_sample_counts({"c": 5}, declared={"a": 1})
    agg = make(WeightedAggregator, site_samples={"site-1": 10, "site-2": 30})
    _, out = _aggregate(agg, {"site-1": ({"w": np.zeros(3, np.float32), "n": np.array(1)}, 10 ** 6),
                              "site-2": ({"w": np.ones(3, np.float32), "n": np.array(1)}, 30)})
    assert from_shareable(out).get_meta_prop(AGGREGATION_WEIGHTS_KEY) == {"site-1": 0.25, "site-2": 0.75}
    with pytest.raises(ValueError, match="positive integers"):
        WeightedAggregator(site_samples={"a": 0})


def test_honest_sample_counts_keep_their_weights_exactly():
    reported = {"a": 16, "b": 64, "c": 32, "d": 32}
    counts, notes = effective_sample_counts(reported)
    assert counts == {k: float(v) for k, v in reported.items()} and not notes


@pytest.mark.parametrize("n", [None, "100", True, 1.5, float("nan"), float("inf"), -3, 0, 10 ** 10])
def test_bad_sample_count_is_refused_naming_the_site(n):
    agg = make(WeightedAggregator)
    ok = agg.accept(_result("site-3", {"w": np.zeros(3, np.float32), "n": np.array(0)}, n), _ctx(0, _model()))
    assert not ok and len(agg.panics) == 1 and "site 'site-3'" in agg.panics[0]


# --------------------------------------------------------------------------------------------------- update values
@pytest.mark.parametrize("value, message", [
    (np.array([1, 2, 3], np.int64), "has type int64"),
    (np.array([1e30, 0, 0], np.float32), "above the accepted magnitude"),
    (np.array([np.inf, 0, 0], np.float32), "NaN or infinite"),
    (np.array(["a", "b", "c"]), "non-numeric"),
    (np.zeros(4, np.float32), "has shape"),
])
def test_bad_update_values_are_refused_naming_the_site(value, message):
    agg = make(WeightedAggregator)
    assert not agg.accept(_result("site-2", {"w": value, "n": np.array(0)}), _ctx(0, _model()))
    assert "site 'site-2'" in agg.panics[0] and message in agg.panics[0]


def test_unknown_parameter_and_unreadable_result_are_refused():
    agg = make(WeightedAggregator, on_invalid_update="skip")
    ctx = _ctx(0, _model())
    assert not agg.accept(_result("site-1", {"w": np.zeros(3, np.float32), "extra": np.zeros(1)}), ctx)
    broken = _result("site-2", {"w": np.zeros(3, np.float32)})
    broken["DXO"] = "not a dxo"
    assert not agg.accept(broken, ctx)
    assert not agg.panics and not agg.updates


# --------------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("cls, key, value", [
    (fa.FedISMAggregator, keys.SHARPNESS, 1e30),
    (fa.FedCEAggregator, keys.FEDCE_MINUS_SCORE, -1e9),
    (fa.AFLAggregator, keys.LOSS_GLOBAL, 1e30),
    (fa.QFedAvgAggregator, keys.LOSS_GLOBAL, 1e200),
    (fa.FairFedAggregator, keys.BACC_GLOBAL_TRAIN, 1.5),
    (fa.FedGAAggregator, keys.LOSS_PREV_LOCAL, -2.0),
    (fa.FedISMAggregator, keys.SHARPNESS, "0.5"),
    (fa.AFLAggregator, keys.LOSS_GLOBAL, [1.0]),
    (fa.FedGAAggregator, keys.PREV_LOCAL_ROUND, 0.5),
])
def test_out_of_range_statistic_is_refused_naming_the_site(cls, key, value):
    agg = make(cls)
    ctx = _ctx(0, initial_model())
    data = site_results(0)
    data["site-2"][2][key] = value
    for site, (w, n, report) in data.items():
        agg.accept(_result(site, w, n, report), ctx)
    agg.aggregate(ctx)  # never raises: a failure is a panic with a message
    assert agg.panics and "site 'site-2'" in agg.panics[0] and key in agg.panics[0]


def test_a_failing_rule_names_the_sites_instead_of_a_traceback():
    agg = make(fa.QFedAvgAggregator, q=400.0)  # F^q overflows for any loss above 6
    ctx = _ctx(0, initial_model())
    for site, (w, n, report) in site_results(0).items():
        report[keys.LOSS_GLOBAL] = 10.0
        assert agg.accept(_result(site, w, n, report), ctx)
    agg.aggregate(ctx)
    assert len(agg.panics) == 1
    message = agg.panics[0]
    assert "qfedavg aggregation failed in round 0" in message and "Traceback" not in message
    assert all(f"site '{s}'" in message for s in site_results(0))


def test_statistic_checks_and_metric_cleaning():
    checked = check_statistics("a", {keys.LOSS_GLOBAL: 2, keys.SHARPNESS: 0.1})
    assert checked == {keys.LOSS_GLOBAL: 2.0, keys.SHARPNESS: 0.1}
    with pytest.raises(ReportError, match=f"site 'a' reported '{keys.LOSS_GLOBAL}'"):
        check_statistics("a", {keys.LOSS_GLOBAL: MAX_LOSS * 2})
    with pytest.raises(ReportError, match="expected a mapping"):
        check_statistics("a", [1, 2])
    assert check_sample_count("a", np.int64(7)) == 7
    kept, notes = clean_metrics("s", {"dice": 1e9, "dice_organ": float("nan"), "bacc": 0.5, "modality": "t1",
                                      "n_test": 4, "train_seconds": 3.2, "nested": {"x": 1}, "flag": True})
    assert kept == {"bacc": 0.5, "modality": "t1", "n_test": 4, "train_seconds": 3.2}
    assert len(notes) == 4 and all("site 's'" in n for n in notes)
    assert bound_for("test_clean_bacc").high == 1.0 and bound_for("train_adv").low < 0
    assert bound_for("train_seconds") is None


def test_out_of_range_cross_site_scores_never_enter_the_matrix():
    results = {"site-1": {"SRV_FL_global_model.pt": {"dice": 0.5, "on_test_split": 1.0}},
               "site-2": {"SRV_FL_global_model.pt": {"dice": 1e9, "dice_organ": 0.4}}}
    cleaned, notes = clean_cross_site(results)
    assert cleaned["site-2"]["SRV_FL_global_model.pt"] == {"dice_organ": 0.4}
    assert cleaned["site-1"] == results["site-1"]
    assert len(notes) == 1 and "site 'site-2'" in notes[0] and "'dice'" in notes[0]


# --------------------------------------------------------------------------------------------------- robust rule
def _five_updates(rs, malicious):
    reference = {"w": rs.normal(size=50).astype(np.float32), "n": np.array(3, np.int64)}
    updates = {s: {"w": (reference["w"] + 0.01 * rs.normal(size=50)).astype(np.float32), "n": np.array(4)}
               for s in FIVE[:4]}
    updates["site-5"] = {"w": (reference["w"] + malicious).astype(np.float32), "n": np.array(10 ** 6)}
    return reference, updates


@pytest.mark.parametrize("method", ["mean", "trimmed_mean", "median"])
def test_one_malicious_site_among_five_cannot_move_the_model_beyond_the_bound(method):
    rs = np.random.RandomState(0)
    reference, updates = _five_updates(rs, malicious=1e5 * np.ones(50))
    rule = RobustRule(clip_norm=0.5, method=method, trim=1)
    weights = {s: (0.96 if s == "site-5" else 0.01) for s in FIVE}  # even with almost all the weight
    combined, norms = robust_average(updates, weights, reference, rule)
    assert norms["site-5"] > 1e5
    assert update_norm(combined, reference) <= 0.5 + 1e-6
    if method != "mean":  # each coordinate stays between the honest sites' values
        honest = np.stack([updates[s]["w"] for s in FIVE[:4]])
        assert np.all(combined["w"] >= honest.min(axis=0) - 1e-6)
        assert np.all(combined["w"] <= honest.max(axis=0) + 1e-6)


def test_robust_rule_through_the_flare_aggregator_and_its_config():
    rs = np.random.RandomState(1)
    reference, updates = _five_updates(rs, malicious=1e4 * rs.normal(size=50))
    model = make_model_learnable(reference, {})
    agg = make(WeightedAggregator, robust={"clip_norm": 1.0, "method": "trimmed_mean", "trim": 1})
    _, out = _aggregate(agg, {s: (u, 32) for s, u in updates.items()}, model=model)
    assert not agg.panics
    assert update_norm(from_shareable(out).data, reference) <= 1.0 + 1e-6
    for bad in ({"method": "krum"}, {"clip_norm": -1}, {"trim": -1}, {"clip": 1.0}, "median"):
        with pytest.raises(ValueError):
            WeightedAggregator(robust=bad)
    with pytest.raises(ValueError, match="clip"):
        fa.QFedAvgAggregator(robust={"method": "median"})


def test_robust_clipping_bounds_a_fairness_rule_too():
    received = {k: v.copy() for k, v in initial_model()[ModelLearnableKey.WEIGHTS].items()}
    data = site_results(0)
    data["site-3"][0]["w"] = np.full(3, 1e5, np.float32)
    for cls in (fa.FedISMAggregator, fa.QFedAvgAggregator):
        agg = make(cls, robust={"clip_norm": 0.5})
        _, out = run_round(agg, 0, initial_model(), data)  # (the generator updates the model it is given)
        moved = {k: out.data[k] for k in ("w", "bn.running_var")}
        assert update_norm(moved, received) <= 0.5 + 1e-5


# --------------------------------------------------------------------------------------------------- privacy filters
def test_partial_updates_are_averaged_over_the_sites_that_sent_them():
    agg = make(WeightedAggregator)
    model = make_model_learnable({"w": np.zeros(2, np.float32), "head": np.full(2, 7.0, np.float32)}, {})
    _, out = _aggregate(agg, {"site-1": ({"w": np.ones(2, np.float32), "head": np.ones(2, np.float32)}, 10),
                              "site-2": ({"w": np.full(2, 3.0, np.float32)}, 30)}, model=model)
    data = from_shareable(out).data
    np.testing.assert_allclose(data["w"], [2.5, 2.5])
    np.testing.assert_allclose(data["head"], [1.0, 1.0])  # only site-1 sent it
    _, out = _aggregate(make(WeightedAggregator), {"site-2": ({"w": np.full(2, 3.0, np.float32)}, 30)}, model=model)
    np.testing.assert_allclose(from_shareable(out).data["head"], [7.0, 7.0])  # nobody sent it: unchanged


def test_weight_differences_give_the_same_model_as_weights():
    rs = np.random.RandomState(2)
    ref = {"w": rs.normal(size=5).astype(np.float32), "n": np.array(8, np.int64)}
    local = {s: {"w": (ref["w"] + rs.normal(size=5)).astype(np.float32), "n": np.array(12, np.int64)} for s in "ab"}
    model = make_model_learnable(ref, {})
    _, full = _aggregate(make(WeightedAggregator), {s: (u, 10) for s, u in local.items()}, model=model)
    diffs = {s: ({"w": (u["w"].astype(np.float64) - ref["w"]), "n": np.array(4.0)}, 10, None, 0, DataKind.WEIGHT_DIFF)
             for s, u in local.items()}
    agg = make(WeightedAggregator)
    ctx = _ctx(0, model)
    for s, args in diffs.items():
        assert agg.accept(_result(s, *args), ctx), agg.panics
    out = from_shareable(agg.aggregate(ctx)).data
    np.testing.assert_allclose(out["w"], from_shareable(full).data["w"], rtol=1e-6)
    assert out["n"] == 12 and out["n"].dtype == np.int64
    assert to_weights({"n": np.array(2.6)}, {"n": np.array(1, np.int32)}, "WEIGHT_DIFF")["n"].dtype == np.int32


def test_flare_privacy_filters_output_is_accepted():
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.filters.exclude_vars import ExcludeVars
    from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
    from nvflare.app_common.filters.svt_privacy import SVTPrivacy

    rs = np.random.RandomState(3)
    ref = {"enc.w": rs.normal(size=20).astype(np.float32), "head.w": rs.normal(size=4).astype(np.float32),
           "bn.num_batches_tracked": np.array(5, np.int64)}
    model = make_model_learnable(ref, {})
    local = {"enc.w": ref["enc.w"] + 0.1, "head.w": ref["head.w"] - 0.1, "bn.num_batches_tracked": np.array(9)}
    diff = {k: np.asarray(v, np.float64) - np.asarray(ref[k], np.float64) for k, v in local.items()}
    cases = [(ExcludeVars(exclude_vars="^head\\."), local, DataKind.WEIGHTS),
             (PercentilePrivacy(percentile=50, gamma=0.05, data_kinds=["WEIGHT_DIFF"]), diff, DataKind.WEIGHT_DIFF),
             (SVTPrivacy(fraction=0.5, epsilon=1.0, noise_var=0.01, data_kinds=["WEIGHT_DIFF"]), diff,
              DataKind.WEIGHT_DIFF)]
    for flt, payload, kind in cases:
        shareable = _result("site-1", {k: np.array(v, copy=True) for k, v in payload.items()}, 16, None, 0, kind)
        filtered = flt.process(shareable, FLContext())
        agg = make(WeightedAggregator)
        ctx = _ctx(0, model)
        assert agg.accept(filtered, ctx), (type(flt).__name__, agg.panics)
        out = from_shareable(agg.aggregate(ctx)).data
        assert set(out) == set(ref) and all(np.all(np.isfinite(v)) for v in out.values())
        assert not agg.panics
    np.testing.assert_array_equal(out["head.w"].shape, ref["head.w"].shape)


def test_check_update_partial_and_kinds():
    ref = {"w": np.zeros(2, np.float32), "n": np.array(1, np.int64)}
    check_update("a", {"w": np.ones(2, np.float32)}, ref, partial=True)
    check_update("a", {"n": np.array(0.5)}, ref, partial=True, kind="WEIGHT_DIFF")
    with pytest.raises(UpdateError, match="site 'a': parameter 'n' has type float64"):
        check_update("a", {"w": np.ones(2, np.float32), "n": np.array(0.5)}, ref)
    with pytest.raises(UpdateError, match="missing"):
        check_update("a", {"w": np.ones(2, np.float32)}, ref)


def test_full_weight_updates_average_to_the_values_by_hand():
    """Weights 2:1:1 normalised to 0.5/0.25/0.25, accumulated in float64; floats keep their dtype, integer counters
    are rounded back."""
    updates = {"s2": {"w": np.array([4.0, 0.0, -2.0, 2.0 ** 25], np.float32), "n": np.array(4, np.int64)},
               "s1": {"w": np.array([1.0, 2.0, 3.0, 4.0], np.float32), "n": np.array(3, np.int64)},
               "s3": {"w": np.array([8.0, 8.0, 0.0, 4.0], np.float32), "n": np.array(8, np.int64)}}
    out = weighted_average(updates, {"s2": 2.0, "s1": 1.0, "s3": 1.0})
    # w: 0.25 * [1, 2, 3] + 0.5 * [4, 0, -2] + 0.25 * [8, 8, 0]; the last entry 1 + 2**24 + 1 is exact in float64
    # (a float32 sum would lose both 1s); n: 0.25 * 3 + 0.5 * 4 + 0.25 * 8 = 4.75 -> 5
    np.testing.assert_array_equal(out["w"], np.array([4.25, 2.5, -0.25, 2.0 ** 24 + 2], np.float32))
    assert out["w"].dtype == np.float32
    assert out["n"] == 5 and out["n"].dtype == np.int64


# --------------------------------------------------------------------------------------------------- site view
def test_each_site_receives_only_its_own_weight_and_no_fairness_state():
    agg = make(fa.FedCEAggregator)
    model, _ = run_round(agg, 0, initial_model(), site_results(0))
    model, _ = run_round(agg, 1, model, site_results(1))
    sent = FullModelShareableGenerator().learnable_to_shareable(model, _ctx(2, model))
    full_meta = from_shareable(sent).meta
    assert keys.AGGREGATOR_STATE_KEY in full_meta and AGGREGATION_WEIGHTS_KEY in full_meta  # what the server keeps
    for site in ("site-2", "site-4"):
        copy = FullModelShareableGenerator().learnable_to_shareable(model, _ctx(2, model))
        meta = from_shareable(site_view(copy, site)).meta
        assert set(meta) == {SITE_WEIGHT_KEY}
        assert meta[SITE_WEIGHT_KEY] == full_meta[AGGREGATION_WEIGHTS_KEY][site]
    assert site_meta({AGGREGATION_WEIGHTS_KEY: {"a": 1.0}, "x": 1}, "b") == {"x": 1}
