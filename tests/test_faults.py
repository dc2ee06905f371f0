"""Faults survived, nothing lost (without a FLARE system): corrupt client state, a dead site in a ring-relay round,
a NaN metric in a round's report."""

import math

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.event_type import EventType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from medflare.flare.executors import SegmentationExecutor
from medflare.flare.executors.base import STATE_FILE, StateError, read_state_file
from medflare.networks import build_model
from medflare.common.results import RunSummary
from medflare.flare.workflows import RingRelayScatterAndGather

SMALL = {"synthetic": {"n_train": 4, "n_val": 2, "n_test": 2}, "batch_size": 4}


def _executor(tmp_path, site="site-1"):
    ex = SegmentationExecutor(**SMALL)
    ex.start(site, str(tmp_path))
    return ex


def _train_task(round_num=0):
    weights = {k: v.numpy() for k, v in build_model("unet").state_dict().items()}
    s = DXO(DataKind.WEIGHTS, data=weights).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_num)
    s.set_header(AppConstants.NUM_ROUNDS, 2)
    return s


def _run_all_tasks(ex):
    return [ex.execute(AppConstants.TASK_TRAIN, _train_task(1), FLContext(), Signal()).get_return_code(),
            ex.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal()).get_return_code(),
            ex.execute(AppConstants.TASK_TRAIN, _train_task(2), FLContext(), Signal()).get_return_code()]


# ---------------------------------------------------------------- client state
@pytest.mark.parametrize("content", [b"not a torch file", b""], ids=["garbage", "empty"])
def test_corrupt_state_file_fails_every_task_naming_file_and_site(tmp_path, content):
    (tmp_path / STATE_FILE).write_bytes(content)
    ex = _executor(tmp_path)
    assert _run_all_tasks(ex) == [ReturnCode.EXECUTION_EXCEPTION] * 3  # never a silent fresh start
    assert not ex._ready
    assert "site 'site-1': client state file" in ex._setup_error and STATE_FILE in ex._setup_error
    assert "cannot be read" in ex._setup_error


def test_truncated_state_file_of_a_real_run_is_refused(tmp_path):
    ex = _executor(tmp_path)
    assert ex.execute(AppConstants.TASK_TRAIN, _train_task(0), FLContext(), Signal()).get_return_code() == ReturnCode.OK
    path = tmp_path / STATE_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(StateError, match=r"site 'site-1': client state file .* cannot be read"):
        read_state_file(str(path), "site-1", SegmentationExecutor.state_keys)
    assert _run_all_tasks(_executor(tmp_path)) == [ReturnCode.EXECUTION_EXCEPTION] * 3


def test_state_file_without_its_keys_or_of_another_model_is_refused(tmp_path):
    torch.save({"rounds_done": 1}, str(tmp_path / STATE_FILE))
    ex = _executor(tmp_path)
    assert _run_all_tasks(ex)[0] == ReturnCode.EXECUTION_EXCEPTION
    assert "lacks ['local_weights', 'optimizer']" in ex._setup_error
    other = {k: torch.zeros(1) for k in build_model("unet").state_dict()}
    torch.save({"local_weights": other, "rounds_done": 1, "optimizer": {"state": {}, "param_groups": [{}]}},
               str(tmp_path / STATE_FILE))
    ex = _executor(tmp_path)
    assert _run_all_tasks(ex) == [ReturnCode.EXECUTION_EXCEPTION] * 3
    assert "does not fit this site's model or optimiser" in ex._setup_error


def test_state_is_restored_before_the_site_is_ready(tmp_path):
    first = _executor(tmp_path)
    first.execute(AppConstants.TASK_TRAIN, _train_task(0), FLContext(), Signal())
    second = _executor(tmp_path)
    assert not second._ready and second.rounds_done == 0
    reply = second.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())
    assert second._ready and second.rounds_done == 1 and reply.get_return_code() == ReturnCode.OK


# ---------------------------------------------------------------- ring relay
class _Engine:
    def __init__(self, sites):
        self.sites = sites

    def get_clients(self):
        return self.sites


def _relay_controller(sites):
    ctl = RingRelayScatterAndGather(min_clients=2, num_rounds=3)
    ctl._engine = _Engine(sites)
    ctl._current_round = 1
    ctl._encoders = {s: {"enc": np.full(2, i + 1, np.float32)} for i, s in enumerate(sites)}
    return ctl


def _site_copy(ctl, site, train):
    """What FLARE sends ``site``: its own copy of the broadcast train task, after the controller's filter hook."""
    from nvflare.apis.fl_constant import FLContextKey
    from nvflare.apis.shareable import make_copy

    fl_ctx = FLContext()
    copy = make_copy(train)
    fl_ctx.set_prop(FLContextKey.TASK_NAME, AppConstants.TASK_TRAIN, private=True, sticky=False)
    fl_ctx.set_prop(FLContextKey.TASK_DATA, copy, private=True, sticky=False)
    fl_ctx.set_peer_context(_PeerContext(site))
    ctl.handle_event(EventType.BEFORE_TASK_DATA_FILTER, fl_ctx)
    return copy


class _PeerContext(FLContext):
    def __init__(self, site):
        super().__init__()
        self._site = site

    def get_identity_name(self, default=""):
        return self._site


def test_ring_relay_rewrites_each_sites_copy_of_the_broadcast():
    """Each site's copy of the one broadcast train task carries the global model and its ring neighbour's encoder;
    the task itself (and so every other site's copy) is left as it was."""
    from nvflare.apis.dxo import from_shareable

    sites = ["site-1", "site-2", "site-3"]
    ctl = _relay_controller(sites)
    ctl.handle_event(AppEventType.ROUND_STARTED, FLContext())
    assert ctl._peers == {"site-1": "site-3", "site-2": "site-1", "site-3": "site-2"}
    train = DXO(DataKind.WEIGHTS, data={"enc": np.zeros(2, np.float32), "dec": np.ones(1, np.float32)}).to_shareable()
    for site, peer in ctl._peers.items():
        dxo = from_shareable(_site_copy(ctl, site, train))
        assert dxo.data_kind == DataKind.COLLECTION and dxo.get_meta_prop("medflare_peer_site") == peer
        np.testing.assert_array_equal(dxo.data["peer_encoder"].data["enc"], ctl._encoders[peer]["enc"])
        np.testing.assert_array_equal(dxo.data["global"].data["dec"], np.ones(1, np.float32))
    assert from_shareable(train).data_kind == DataKind.WEIGHTS  # the broadcast task itself is untouched


def test_ring_relay_uses_flares_broadcast():
    """The relay sends its train task with ScatterAndGather's own broadcast (one task to every site, its quorum,
    ``wait_time_after_min_received`` and abort handling): it only rewrites each site's copy."""
    from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather

    for name in ("broadcast_and_wait", "send_and_wait", "control_flow"):
        assert getattr(RingRelayScatterAndGather, name) is getattr(ScatterAndGather, name), name


def test_ring_relay_sends_the_plain_global_model_before_any_encoder():
    from nvflare.apis.dxo import from_shareable

    ctl = _relay_controller(["site-1", "site-2"])
    ctl._encoders = {}
    ctl.handle_event(AppEventType.ROUND_STARTED, FLContext())
    train = DXO(DataKind.WEIGHTS, data={"enc": np.zeros(2, np.float32)}).to_shareable()
    assert from_shareable(_site_copy(ctl, "site-1", train)).data_kind == DataKind.WEIGHTS


# ---------------------------------------------------------------- a bad metric never loses a round
def test_nan_dice_keeps_the_round_report(tmp_path):
    summary = RunSummary(str(tmp_path))
    entry = summary.add_round(0, {"site-1": {"dice": 0.5, "test_dice": 0.4}, "site-2": {"dice": math.nan},
                                  "site-3": {"dice": 0.7, "test_dice": math.nan}})
    assert entry["unscored_sites"] == ["site-2"]
    assert entry["fairness"]["n_sites"] == 2 and entry["fairness"]["mean"] == pytest.approx(0.6)
    assert sorted(entry["sites"]) == ["site-1", "site-2", "site-3"]
    assert summary.data["test"]["rounds"][0]["sites"] == {"site-1": 0.4}
    assert (tmp_path / "metrics" / "round_metrics.csv").read_text().count("\n") == 4


def test_a_failing_report_neither_stops_the_round_nor_keeps_stale_encoders(monkeypatch):
    ctl = _relay_controller(["site-1", "site-2"])
    fresh = {"site-1": {"enc": np.ones(2, np.float32)}}
    ctl._incoming = dict(fresh)
    ctl._site_metrics = {"site-1": {"dice": math.nan}}

    def broken_report(fl_ctx):
        raise ValueError("non-finite metric from sites ['site-1']")

    monkeypatch.setattr(ctl, "_report_round", broken_report)
    ctl.handle_event(AppEventType.ROUND_DONE, FLContext())
    assert ctl._encoders == fresh and ctl._incoming == {}
