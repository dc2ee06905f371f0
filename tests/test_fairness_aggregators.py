"""FLARE aggregators of the fairness suite: weights as the pure rules say, state carried by the global model
(through FLARE's shareable generator and the PyTorch checkpoint format), missing sites, and no access to site data."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from medflare.algorithms import fairness as fr
from medflare.flare import fairness_aggregators as fa
from medflare import keys
from medflare.keys import AGGREGATION_WEIGHTS_KEY, SITE_REPORT_KEY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITES = ["site-1", "site-2", "site-3", "site-4"]


def _ctx(round_num, global_model, num_rounds=10):
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, round_num, private=True, sticky=False)
    ctx.set_prop(AppConstants.NUM_ROUNDS, num_rounds, private=True, sticky=False)
    ctx.set_prop(AppConstants.GLOBAL_MODEL, global_model, private=True, sticky=False)
    return ctx


def _result(site, weights, n, report, round_num):
    dxo = DXO(DataKind.WEIGHTS, data=weights)
    dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, n)
    dxo.set_meta_prop(SITE_REPORT_KEY, report)
    s = dxo.to_shareable()
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, round_num)
    return s


class Recorder:
    """Mixin that records panics instead of stopping a run."""

    def system_panic(self, reason, fl_ctx):
        self.panics.append(reason)


def make(cls, **kw):
    agg = type(cls.__name__, (Recorder, cls), {})(**kw)
    agg.panics = []
    return agg


def run_round(agg, round_num, global_model, site_data, num_rounds=10):
    """Feed one round of results through the aggregator and FLARE's shareable generator; returns the new model."""
    ctx = _ctx(round_num, global_model, num_rounds)
    for site, (weights, n, report) in site_data.items():
        assert agg.accept(_result(site, weights, n, report, round_num), ctx), agg.panics
    shareable = agg.aggregate(ctx)
    agg.reset(ctx)
    assert not agg.panics, agg.panics
    return FullModelShareableGenerator().shareable_to_learnable(shareable, ctx), from_shareable(shareable)


def initial_model():
    return make_model_learnable({"w": np.zeros(3, np.float32), "bn.running_var": np.ones(2, np.float32),
                                 "bn.num_batches_tracked": np.array(0, np.int64)}, {})


def site_results(round_num, sites=SITES):
    rs = np.random.RandomState(round_num)
    out = {}
    for i, s in enumerate(sites):
        k = SITES.index(s)
        out[s] = ({"w": rs.normal(size=3).astype(np.float32),
                   "bn.running_var": rs.uniform(0.5, 2, 2).astype(np.float32),
                   "bn.num_batches_tracked": np.array(4 * (round_num + 1), np.int64)},
                  [32, 64, 32, 16][k],
                  {keys.SHARPNESS: [0.01, 0.02, 0.05, 0.1][k] * (1 + round_num),
                   keys.LOSS_GLOBAL: [0.5, 1.0, 1.5, 2.0][k],
                   keys.BACC_GLOBAL_TRAIN: [0.9, 0.8, 0.6, 0.5][k], keys.LOSS_PREV_LOCAL: [0.4, 0.5, 0.6, 0.7][k],
                   keys.PREV_LOCAL_ROUND: round_num - 1, keys.FEDCE_MINUS_SCORE: [0.7, 0.6, 0.5, 0.4][k]})
    return out


AGGREGATORS = [
    (fa.FedISMAggregator, {"q": 2.0, "beta": 0.5}),
    (fa.AFLAggregator, {"lambda_lr": 0.1}),
    (fa.QFedAvgAggregator, {"q": 1.0, "lipschitz": 1.0}),
    (fa.QFedAvgAggregator, {"q": 2.0, "mode": "weights"}),
    (fa.FairFedAggregator, {"beta": 1.0}),
    (fa.FedGAAggregator, {"step": 0.05}),
    (fa.FedCEAggregator, {"mode": "times"}),
]


def test_fedism_weights_and_ema_state_through_flare():
    agg = make(fa.FedISMAggregator, q=2.0, beta=0.5)
    model = initial_model()
    model, out0 = run_round(agg, 0, model, site_results(0))
    w0 = fr.fedism_weights({s: r[2][keys.SHARPNESS] for s, r in site_results(0).items()}, 2.0, 0.5)
    assert out0.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == pytest.approx(w0)
    expected = sum(w0[s] * r[0]["w"].astype(np.float64) for s, r in site_results(0).items())
    np.testing.assert_allclose(out0.data["w"], expected, rtol=1e-5)
    # the state travels in the global model's meta
    assert model[ModelLearnableKey.META][keys.AGGREGATOR_STATE_KEY]["state"]["weights"] == pytest.approx(w0)
    model, out1 = run_round(agg, 1, model, site_results(1))
    w1 = fr.fedism_weights({s: r[2][keys.SHARPNESS] for s, r in site_results(1).items()}, 2.0, 0.5, prev=w0)
    assert out1.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == pytest.approx(w1)


def test_qfedavg_update_uses_the_global_model():
    agg = make(fa.QFedAvgAggregator, q=1.0, lipschitz=1.0)
    model = initial_model()
    received = {k: v.copy() for k, v in model[ModelLearnableKey.WEIGHTS].items()}
    data = site_results(0)
    _, out = run_round(agg, 0, model, data)
    expected, _ = fr.qfedavg_update(received, {s: d[0] for s, d in data.items()},
                                    {s: d[2][keys.LOSS_GLOBAL] for s, d in data.items()}, 1.0, 1.0)
    np.testing.assert_allclose(out.data["w"], expected["w"], rtol=1e-6)


def test_fedga_uses_only_gaps_of_the_previous_round():
    agg = make(fa.FedGAAggregator, step=0.05)
    model, out0 = run_round(agg, 0, initial_model(), site_results(0))
    assert out0.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == pytest.approx({s: 0.25 for s in SITES})
    data = site_results(1)
    stale = data["site-4"][2]
    stale[keys.PREV_LOCAL_ROUND] = -5  # a local model from long ago is not a gap of this aggregation
    _, out1 = run_round(agg, 1, model, data)
    gaps = {s: d[2][keys.LOSS_GLOBAL] - d[2][keys.LOSS_PREV_LOCAL] for s, d in data.items() if s != "site-4"}
    expected = fr.fedga_weights(gaps, {s: 0.25 for s in SITES}, 0, 10, 0.05, present=SITES)
    assert out1.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == pytest.approx(expected)


@pytest.mark.parametrize("cls,kw", AGGREGATORS, ids=[f"{c.__name__}-{k}" for c, k in AGGREGATORS])
def test_resumed_run_continues_with_the_saved_state(cls, kw, tmp_path):
    """Three rounds in one go == two rounds, checkpoint (PyTorch persistence format), new aggregator, one round."""
    agg = make(cls, **kw)
    model = initial_model()
    for r in range(3):
        model, straight = run_round(agg, r, model, site_results(r))

    agg = make(cls, **kw)
    model = initial_model()
    for r in range(2):
        model, _ = run_round(agg, r, model, site_results(r))
    manager = PTModelPersistenceFormatManager({"model": {k: torch.as_tensor(v) for k, v in
                                                          model[ModelLearnableKey.WEIGHTS].items()}})
    manager.update(model)
    buffer = io.BytesIO()
    torch.save(manager.to_persistence_dict(), buffer)
    buffer.seek(0)
    restored = PTModelPersistenceFormatManager(torch.load(buffer, weights_only=False)).to_model_learnable([])
    resumed_agg = make(cls, **kw)  # a fresh server process
    _, resumed = run_round(resumed_agg, 2, restored, site_results(2))
    expected = straight.get_meta_prop(AGGREGATION_WEIGHTS_KEY)
    assert resumed.get_meta_prop(AGGREGATION_WEIGHTS_KEY) == pytest.approx(expected)
    np.testing.assert_allclose(resumed.data["w"], straight.data["w"], rtol=1e-5)
    assert resumed.get_meta_prop(keys.AGGREGATOR_STATE_KEY)["round"] == 2


@pytest.mark.parametrize("cls,kw", AGGREGATORS, ids=[f"{c.__name__}-{k}" for c, k in AGGREGATORS])
def test_a_site_missing_a_round(cls, kw):
    """The weights cover the sites that answered; a stateful rule keeps the absent site's state for its return."""
    agg = make(cls, **kw)
    model, _ = run_round(agg, 0, initial_model(), site_results(0))
    before = model[ModelLearnableKey.META][keys.AGGREGATOR_STATE_KEY]["state"]
    model, out = run_round(agg, 1, model, site_results(1, SITES[:3]))
    weights = out.get_meta_prop(AGGREGATION_WEIGHTS_KEY)
    assert sorted(weights) == SITES[:3]
    if cls is not fa.QFedAvgAggregator or kw.get("mode") == "weights":
        assert sum(weights.values()) == pytest.approx(1.0)
    after = model[ModelLearnableKey.META][keys.AGGREGATOR_STATE_KEY]["state"]
    for key in ("weights", "lambda", "coef"):
        if key in before:
            assert after[key]["site-4"] == pytest.approx(before[key]["site-4"])
    _, out = run_round(agg, 2, model, site_results(2))  # the site is back
    assert sorted(out.get_meta_prop(AGGREGATION_WEIGHTS_KEY)) == SITES


def test_missing_statistic_stops_the_run_naming_the_site():
    agg = make(fa.FedISMAggregator)
    ctx = _ctx(0, initial_model())
    data = site_results(0)
    data["site-2"][2].pop(keys.SHARPNESS)
    for site, (w, n, report) in data.items():
        agg.accept(_result(site, w, n, report, 0), ctx)
    agg.aggregate(ctx)
    assert agg.panics and "site-2" in agg.panics[0] and keys.SHARPNESS in agg.panics[0]


BLOCKER = r"""
import builtins, importlib.abc, sys
BLOCKED = ("medflare.data", "medflare.classification", "medflare.flare.executors", "medflare.algorithms.sam", "medflare.segmentation.training")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(BLOCKED):
            raise ImportError("aggregation code must not import " + name)
sys.meta_path.insert(0, Block())
for name in [m for m in sys.modules if m.startswith(BLOCKED)]:
    del sys.modules[name]
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import test_fairness_aggregators as t
real_open = builtins.open
def no_open(*a, **k):
    raise AssertionError("aggregation opened a file: %r" % (a[:1],))
for cls, kw in t.AGGREGATORS:
    agg = t.make(cls, **kw)
    model = t.initial_model()
    builtins.open = no_open
    try:
        for r in range(3):
            model, _ = t.run_round(agg, r, model, t.site_results(r))
    finally:
        builtins.open = real_open
print("OK", len(t.AGGREGATORS))
"""


def test_no_aggregation_code_path_reads_client_data():
    """With every data-loading module unimportable and file access forbidden, all rules still aggregate: the
    server works from the sites' weights and reported scalars only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", BLOCKER, os.path.join(REPO, "custom"), os.path.join(REPO, "tests")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    # and the modules the server loads for aggregation do not depend on the data modules
    check = ("import sys; sys.path.insert(0, sys.argv[1]); import medflare.flare.fairness_aggregators, json; "
             "print(json.dumps(sorted(m for m in sys.modules if m.startswith('medflare'))))")
    proc = subprocess.run([sys.executable, "-c", check, os.path.join(REPO, "custom")], capture_output=True, text=True,
                          env=env, timeout=300)
    loaded = json.loads(proc.stdout)
    assert not [m for m in loaded if m.startswith(("medflare.data", "medflare.classification", "medflare.flare.executors"))]
