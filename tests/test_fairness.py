"""Fair aggregation rules (medflare.algorithms.fairness) on hand-made inputs with answers worked out by hand."""

import math

import numpy as np
import pytest

from medflare.algorithms import fairness as F


def approx(d, **kw):
    return pytest.approx(d, abs=kw.get("abs", 1e-6))


# ------------------------------------------------------------------------------------------------ helpers
def test_normalize_and_zero_sum_fallback():
    assert F.normalize({"a": 1, "b": 3}) == approx({"a": 0.25, "b": 0.75})
    assert F.normalize({"a": 0, "b": 0}) == approx({"a": 0.5, "b": 0.5})
    assert F.normalize({"a": 0, "b": 0}, fallback={"a": 1, "b": 3}) == approx({"a": 0.25, "b": 0.75})
    with pytest.raises(ValueError):
        F.normalize({"a": -1.0, "b": 2.0})
    with pytest.raises(ValueError):
        F.normalize({"a": float("nan")})


# ------------------------------------------------------------------------------------------------ FedISM
def test_fedism_first_round_is_sharpness_power():
    # p = (1/4, 3/4); q=1 keeps it, q=2 gives (1/16, 9/16) / (10/16) = (0.1, 0.9)
    assert F.fedism_weights({"a": 1.0, "b": 3.0}, q=1.0) == approx({"a": 0.25, "b": 0.75})
    assert F.fedism_weights({"a": 1.0, "b": 3.0}, q=2.0) == approx({"a": 0.1, "b": 0.9})


def test_fedism_ema_of_weights():
    # beta * p + (1 - beta) * prev = 0.5 * (0.1, 0.9) + 0.5 * (0.5, 0.5) = (0.3, 0.7)
    w = F.fedism_weights({"a": 1.0, "b": 3.0}, q=2.0, beta=0.5, prev={"a": 0.5, "b": 0.5})
    assert w == approx({"a": 0.3, "b": 0.7})
    # beta = 1: no memory
    assert F.fedism_weights({"a": 1.0, "b": 3.0}, q=2.0, beta=1.0, prev={"a": 0.5, "b": 0.5}) == approx(
        {"a": 0.1, "b": 0.9})


def test_fedism_sharper_site_gets_more_weight_and_zero_sharpness_is_clamped():
    w = F.fedism_weights({"a": 0.0, "b": 1e-3, "c": 2e-3}, q=2.0)
    assert w["a"] < w["b"] < w["c"] and sum(w.values()) == pytest.approx(1.0)
    assert F.fedism_weights({"a": 0.0, "b": 0.0}) == approx({"a": 0.5, "b": 0.5})


def test_fedism_missing_site_uses_renormalised_previous_weights():
    # c is absent: prev restricted to (a, b) = (0.2, 0.3) / 0.5 = (0.4, 0.6); p = (0.5, 0.5)
    w = F.fedism_weights({"a": 1.0, "b": 1.0}, q=1.0, beta=0.5, prev={"a": 0.2, "b": 0.3, "c": 0.5})
    assert w == approx({"a": 0.45, "b": 0.55})
    # a new site d enters with its own p (0.5) as "previous" weight: prev = (0.2, 0.5) / 0.7
    w = F.fedism_weights({"a": 1.0, "d": 1.0}, q=1.0, beta=0.5, prev={"a": 0.2, "b": 0.8})
    assert w == approx({"a": 0.25 + 0.5 * 2 / 7, "d": 0.25 + 0.5 * 5 / 7})


# ------------------------------------------------------------------------------------------------ q-FedAvg
def test_qfedavg_update_scalar_by_hand():
    # w=1, w_a=0 (F=1), w_b=2 (F=2), q=1, L=1: dw=(1,-1), D=(1,-2), h=(1+1, 1+2) -> w - (1-2)/5 = 1.2
    new, coef = F.qfedavg_update({"w": np.array([1.0])}, {"a": {"w": np.array([0.0])}, "b": {"w": np.array([2.0])}},
                                 {"a": 1.0, "b": 2.0}, q=1.0, lipschitz=1.0)
    assert new["w"] == pytest.approx([1.2])
    assert coef == approx({"a": 0.2, "b": 0.4})


def test_qfedavg_with_q0_is_fedavg_and_keeps_dtypes():
    glob = {"w": np.array([1.0, 5.0], np.float32), "n": np.array(3, np.int64)}
    local = {"a": {"w": np.array([0.0, 4.0], np.float32), "n": np.array(4, np.int64)},
             "b": {"w": np.array([2.0, 8.0], np.float32), "n": np.array(6, np.int64)}}
    new, _ = F.qfedavg_update(glob, local, {"a": 0.7, "b": 3.0}, q=0.0, lipschitz=10.0)
    assert new["w"] == pytest.approx([1.0, 6.0]) and new["w"].dtype == np.float32
    assert int(new["n"]) == 5 and new["n"].dtype == np.int64


def test_qfedavg_higher_loss_pulls_harder():
    glob = {"w": np.array([0.0])}
    local = {"a": {"w": np.array([-1.0])}, "b": {"w": np.array([1.0])}}
    new, _ = F.qfedavg_update(glob, local, {"a": 0.5, "b": 2.0}, q=2.0, lipschitz=1.0)
    assert new["w"][0] > 0


def test_qfedavg_norm_ignores_batchnorm_statistics_and_small_L_tends_to_loss_weighting():
    glob = {"w": np.array([1.0]), "bn.running_var": np.array([1.0])}
    local = {"a": {"w": np.array([0.0]), "bn.running_var": np.array([100.0])},
             "b": {"w": np.array([2.0]), "bn.running_var": np.array([1.0])}}
    new, _ = F.qfedavg_update(glob, local, {"a": 1.0, "b": 2.0}, q=1.0, lipschitz=1.0)
    assert new["w"] == pytest.approx([1.2])  # the same as without the running variance
    assert new["bn.running_var"] == pytest.approx([1.0 - (0.2 * -99.0)])
    tiny, _ = F.qfedavg_update(glob, local, {"a": 1.0, "b": 3.0}, q=1.0, lipschitz=1e-6)
    assert tiny["w"] == pytest.approx([0.25 * 0.0 + 0.75 * 2.0], rel=1e-4)


def test_qffl_weights_power_of_losses():
    assert F.qffl_weights({"a": 1.0, "b": 3.0}, q=1.0) == approx({"a": 0.25, "b": 0.75})
    w = F.qffl_weights({"a": 1.0, "b": 1.1}, q=200.0)  # approaches AFL's argmax
    assert w["b"] > 0.999


# ------------------------------------------------------------------------------------------------ AFL
def test_project_simplex_known_points():
    assert F.project_simplex([0.6, 0.8]) == pytest.approx([0.4, 0.6])
    assert F.project_simplex([2.0, 0.0]) == pytest.approx([1.0, 0.0])
    assert F.project_simplex([0.2, 0.3]) == pytest.approx([0.45, 0.55])
    assert F.project_simplex([0.2, 0.3], total=0.5) == pytest.approx([0.2, 0.3])
    x = F.project_simplex(np.random.RandomState(0).normal(size=7))
    assert x.min() >= 0 and x.sum() == pytest.approx(1.0)


def test_afl_ascends_on_losses():
    used, state = F.afl_step({"a": 1.0, "b": 3.0}, None, lambda_lr=0.1)
    assert used == approx({"a": 0.5, "b": 0.5})          # this round averages with the current (uniform) mixture
    assert state == approx({"a": 0.4, "b": 0.6})         # Proj((0.6, 0.8)) = (0.4, 0.6)
    used, state = F.afl_step({"a": 1.0, "b": 3.0}, state, lambda_lr=0.1)
    assert used == approx({"a": 0.4, "b": 0.6})
    assert state == approx({"a": 0.3, "b": 0.7})


def test_afl_missing_site_keeps_its_mass():
    used, state = F.afl_step({"a": 1.0, "b": 3.0}, {"a": 0.25, "b": 0.25, "c": 0.5}, lambda_lr=0.1)
    assert used == approx({"a": 0.5, "b": 0.5})
    # (0.35, 0.55) projected onto the simplex of mass 0.5 -> (0.15, 0.35); c keeps 0.5
    assert state == approx({"a": 0.15, "b": 0.35, "c": 0.5})


# ------------------------------------------------------------------------------------------------ FairFed
def test_fairfed_first_round_is_sample_weighted():
    assert F.fairfed_weights({"a": 0.9, "b": 0.5}, {"a": 100, "b": 300}) == approx({"a": 0.25, "b": 0.75})


def test_fairfed_update_by_hand():
    # mean = (100*.9 + 300*.5)/400 = .6; D = (.3, .1); mean D = .2; a = (.25 - .1, .75 + .1) = (.15, .85)
    w = F.fairfed_weights({"a": 0.9, "b": 0.5}, {"a": 100, "b": 300}, prev={"a": 0.25, "b": 0.75}, beta=1.0)
    assert w == approx({"a": 0.15, "b": 0.85})


def test_fairfed_clips_at_zero():
    w = F.fairfed_weights({"a": 0.9, "b": 0.5}, {"a": 100, "b": 300}, prev={"a": 0.05, "b": 0.95}, beta=1.0)
    assert w == approx({"a": 0.0, "b": 1.0})


# ------------------------------------------------------------------------------------------------ FedGA
def test_fedga_step_and_update_by_hand():
    assert F.fedga_step_size(0, 10, 2) == pytest.approx(0.025)
    assert F.fedga_step_size(5, 10, 2) == pytest.approx(0.0125)
    # GA = (.3, .1) - .2 = (.1, -.1); max|GA| = .1; a = (.5 + .025, .5 - .025)
    w = F.fedga_weights({"a": 0.3, "b": 0.1}, {"a": 0.5, "b": 0.5}, round_num=0, num_rounds=10)
    assert w == approx({"a": 0.525, "b": 0.475})


def test_fedga_first_round_uniform_and_missing_gap_keeps_weight():
    assert F.fedga_weights({"a": 0.3, "b": 0.1}, None, 0, 10) == approx({"a": 0.5, "b": 0.5})
    # c present but without a gap: its previous weight is kept before renormalisation
    w = F.fedga_weights({"a": 0.3, "b": 0.1}, {"a": 0.25, "b": 0.25, "c": 0.5}, 0, 10, present=["a", "b", "c"])
    d = F.fedga_step_size(0, 10, 3)
    assert w == approx({"a": 0.25 + d, "b": 0.25 - d, "c": 0.5})


# ------------------------------------------------------------------------------------------------ FedCE
def test_fedce_cosine_leave_one_out():
    ups = {"a": {"w": np.array([1.0, 0.0])}, "b": {"w": np.array([1.0, 1.0])}, "c": {"w": np.array([0.0, 1.0])}}
    cos = F.fedce_cosines(ups, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, ["w"])
    # U - u_a/3 = (1/3, 2/3): cos((1,0), (1,2)) = 1/sqrt(5)
    assert cos["a"] == pytest.approx(1 / math.sqrt(5))
    assert cos["c"] == pytest.approx(1 / math.sqrt(5))
    assert cos["b"] == pytest.approx(1.0)  # (1/3, 1/3) is parallel to (1, 1)


def test_fedce_coefficients_times_and_plus():
    # G = (.5, .5); M = (.8, .4)/1.2 = (2/3, 1/3)
    times = F.fedce_coefficients({"a": 0.0, "b": 0.0}, {"a": 0.2, "b": 0.6}, "times")
    assert times == approx({"a": 2 / 3, "b": 1 / 3})
    plus = F.fedce_coefficients({"a": 0.0, "b": 0.0}, {"a": 0.2, "b": 0.6}, "plus")
    assert plus == approx({"a": (0.5 + 2 / 3) / 2, "b": (0.5 + 1 / 3) / 2})


def test_fedce_step_time_average_and_missing_site():
    ups = {"a": {"w": np.array([1.0, 0.0])}, "b": {"w": np.array([0.0, 1.0])}}
    w, state = F.fedce_step(ups, {"a": None, "b": None}, None, ["w"])  # first round: m = 0 for both
    assert w == approx({"a": 0.5, "b": 0.5})
    w, state = F.fedce_step(ups, {"a": 0.2, "b": 0.6}, state, ["w"])
    # minus means: a (0 + .2)/2 = .1, b .3 -> M = (.9, .7)/1.6; ctilde = M; weight = mean(ctilde history)
    ct = {"a": 0.9 / 1.6, "b": 0.7 / 1.6}
    assert w == approx({"a": (0.5 + ct["a"]) / 2, "b": (0.5 + ct["b"]) / 2})
    state["coef"]["c"] = 0.3
    state["cos"]["c"] = [0.9]
    w2, state2 = F.fedce_step(ups, {"a": 0.2, "b": 0.6}, state, ["w"])  # c absent
    assert set(w2) == {"a", "b"} and sum(w2.values()) == pytest.approx(1.0)
    assert state2["coef"]["c"] == 0.3 and state2["cos"]["c"] == [0.9]


def test_minus_model_removes_the_site_contribution():
    glob = {"w": np.array([1.0]), "bn.running_var": np.array([0.1]), "n": np.array(7)}
    prev = {"w": np.array([2.0]), "bn.running_var": np.array([1.0]), "n": np.array(9)}
    m = F.minus_model(glob, prev, 0.25)
    assert m["w"] == pytest.approx([(1.0 - 0.5) / 0.75])
    assert m["bn.running_var"][0] > 0 and int(m["n"]) == 7
    with pytest.raises(ValueError):
        F.minus_model(glob, prev, 1.0)
    assert F.is_trainable_key("conv.weight") and not F.is_trainable_key("bn.running_mean")


def test_fedism_with_q_zero_is_uniform_so_it_equals_fedavg_on_equal_sites():
    """The q = 0 ablation: FedISM's weights ignore sharpness and stay uniform across rounds, which is what FedAvg
    gives sites of equal size (FedISM with q = 0 is FedAvg + GSAM)."""
    first = F.fedism_weights({"a": 0.01, "b": 5.0, "c": 0.3}, q=0.0)
    assert first == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    later = F.fedism_weights({"a": 9.0, "b": 0.1, "c": 0.3}, q=0.0, prev=first)
    assert later == pytest.approx(first)
    assert F.fedism_weights({"a": 0.01, "b": 5.0}, q=2.0)["b"] > 0.99
