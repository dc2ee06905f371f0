"""What crosses a site's boundary, key by key, for every executor (segmentation, FedDA joint/cyclic/domain,
classification): the meta a site receives with a train task (as the server's controller restricts it), and exactly
what it sends back. A new key in either direction must be added here, and to docs/privacy.md, on purpose."""

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.shareablegenerators.full_model_shareable_generator import FullModelShareableGenerator

from medflare.flare.executors import (AdversarialAlignmentExecutor, ClassificationExecutor, DittoExecutor,
                                      SegmentationExecutor)
from medflare.keys import AGGREGATION_WEIGHTS_KEY, AGGREGATOR_STATE_KEY, PEER_SITE_KEY, SITE_REPORT_KEY, SITE_WEIGHT_KEY
from medflare.segmentation.networks import FeatureUNet
from medflare.networks import build_model
from medflare.flare.site_policy import parse_site_policy
from medflare.flare.site_view import site_view

SEG = {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 4}, "batch_size": 4}
CLS = {"synthetic": {"n_train": 16, "n_val": 8, "n_test": 8, "seed": 0}, "batch_size": 8, "global_test_sites": [],
       "model": {"name": "tiny_cnn"}}
DOMAIN_MODEL = {"name": "unet_domain", "n_domains": 3}
OUT_META = {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS, SITE_REPORT_KEY}
DICE = {"dice", "dice_organ", "dice_lesion"}
SEG_REPORT = {"modality", "n_train", "n_val", "n_test", "test_dice", "test_dice_organ", "test_dice_lesion",
              "dice_local", "train_seconds", "train_loss", "train_seg", "deployed_model", "site_local_layers"}
CLS_METRICS = {"acc", "bacc", "auc", "loss"}
CLS_REPORT = {"quality", "n_train", "n_val", "n_test", "test_bacc", "test_auc", "bacc_local", "train_seconds",
              "probe_seconds", "train_loss", "loss_global", "bacc_global_train", "rho"}


def _executor(cls, tmp_path, site="site-1", **kwargs):
    ex = cls(**kwargs)
    ex.start(site, str(tmp_path))
    return ex


def _server_task(weights, site, round_num=0, peer=None):
    """A train task as the server sends it to ``site``: the global model with the server's full bookkeeping in its
    meta (every site's weight, a fairness rule's per-site state), restricted by the controller for ``site``."""
    meta = {AGGREGATION_WEIGHTS_KEY: {"site-1": 0.3, "site-2": 0.7, "site-3": 0.0},
            AGGREGATOR_STATE_KEY: {"rule": "fedce", "round": round_num - 1,
                        "state": {"minus": {"site-2": [0.4]}, "cos": {"site-2": [0.1]}}}}
    model = make_model_learnable(weights, meta)
    task = FullModelShareableGenerator().learnable_to_shareable(model, FLContext())
    if peer is not None:
        task = DXO(DataKind.COLLECTION, data={"global": from_shareable(task),
                                               "peer_encoder": DXO(DataKind.WEIGHTS, data=peer[1])},
                   meta={PEER_SITE_KEY: peer[0]}).to_shareable()
    task.set_header(AppConstants.CURRENT_ROUND, round_num)
    task.set_header(AppConstants.NUM_ROUNDS, 2)
    return site_view(task, site)


def _inbound_meta(task):
    dxo = from_shareable(task)
    if dxo.data_kind == DataKind.COLLECTION:
        return set(dxo.meta), set(dxo.data["global"].meta), dxo.data["global"].meta
    return set(), set(dxo.meta), dxo.meta


def _numpy(model):
    return {k: v.numpy() for k, v in build_model(**model).state_dict().items()}


def _check_outbound(result, model_keys, metrics, report, kind=DataKind.WEIGHTS):
    dxo = from_shareable(result)
    assert dxo.data_kind == kind
    assert set(dxo.data) == model_keys and all(isinstance(v, np.ndarray) for v in dxo.data.values())
    assert {k for k in dxo.meta if not k.startswith("__")} == OUT_META
    assert set(dxo.get_meta_prop(MetaKey.INITIAL_METRICS)) == metrics
    assert set(dxo.get_meta_prop(SITE_REPORT_KEY)) == report
    return dxo


@pytest.mark.parametrize("case", ["segmentation", "fedda-joint", "fedda-cyclic", "fedda-domain", "ditto"])
def test_segmentation_executors_send_exactly_these_keys(case, tmp_path):
    model = DOMAIN_MODEL if case == "fedda-domain" else {"name": "unet"}
    if case == "segmentation":
        ex = _executor(SegmentationExecutor, tmp_path, **SEG)
    elif case == "ditto":
        ex = _executor(DittoExecutor, tmp_path, **SEG)
    else:
        mode = "domain" if case == "fedda-domain" else "target"
        ex = _executor(AdversarialAlignmentExecutor, tmp_path, mode=mode, warmup_rounds=0,
                       **({"model": DOMAIN_MODEL} if mode == "domain" else {}), **SEG)
    weights = _numpy(model)
    peer = None
    if case == "fedda-cyclic":
        net = FeatureUNet()
        peer = ("site-3", {k: v.numpy() for k, v in net.state_dict().items() if k in net.encoder_keys()})
    task = _server_task(weights, "site-1", 1, peer)
    outer, inner, meta = _inbound_meta(task)
    assert inner == {SITE_WEIGHT_KEY} and meta[SITE_WEIGHT_KEY] == 0.3  # its own weight, nobody else's
    assert outer == ({PEER_SITE_KEY} if peer else set())
    result = ex.execute(AppConstants.TASK_TRAIN, task, FLContext(), Signal())
    report = set(SEG_REPORT)
    if case in ("fedda-joint", "fedda-cyclic"):
        report |= {"train_adv", "train_disc", "train_disc_acc"}
    if case == "fedda-domain":
        report |= {"domain_acc", "train_adv", "train_head", "train_head_acc"}
    if case == "ditto":
        report |= {"personal_dice", "test_personal_dice"}
    _check_outbound(result, set(weights), DICE, report)
    if case == "segmentation":  # a result filter editing the payload in place leaves the site's own model whole
        from nvflare.app_common.filters.exclude_vars import ExcludeVars

        filtered = from_shareable(ExcludeVars(exclude_vars="^model\\.2\\.").process(result, FLContext()))
        assert len(filtered.data) < len(weights) and set(ex.local_weights) == set(weights)
        submitted = ex.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())
        assert set(from_shareable(submitted).data) == set(weights)


def test_classification_executor_sends_exactly_these_keys(tmp_path):
    ex = _executor(ClassificationExecutor, tmp_path, **CLS)
    weights = _numpy({"name": "tiny_cnn", "in_channels": 1, "num_classes": 4})
    first = _server_task(weights, "site-1", 0)
    assert _inbound_meta(first)[1] == {SITE_WEIGHT_KEY}
    result = ex.execute(AppConstants.TASK_TRAIN, first, FLContext(), Signal())
    _check_outbound(result, set(weights), CLS_METRICS, CLS_REPORT | {"sharpness"})
    # round 1: the previous local model exists, so FedGA's and FedCE's statistics are added (FedCE's minus model
    # needs this site's own weight, 0.3, which is all the site learns about the aggregation)
    result = ex.execute(AppConstants.TASK_TRAIN, _server_task(weights, "site-1", 1), FLContext(), Signal())
    _check_outbound(result, set(weights), CLS_METRICS,
                    CLS_REPORT | {"sharpness", "loss_prev_local", "prev_local_round", "fedce_minus_score"})


@pytest.mark.parametrize("cls, settings, model, metrics, report, local_key", [
    (SegmentationExecutor, SEG, {"name": "unet"}, DICE, SEG_REPORT, "dice_local"),
    (ClassificationExecutor, {**CLS, "reports": []}, {"name": "tiny_cnn", "in_channels": 1, "num_classes": 4},
     CLS_METRICS, CLS_REPORT, "bacc_local")])
def test_local_model_evaluation_can_be_switched_off(cls, settings, model, metrics, report, local_key, tmp_path):
    weights = _numpy(model)
    results = {}
    for evaluate in (True, False):
        ex = _executor(cls, tmp_path / str(evaluate), evaluate_local_model=evaluate, **settings)
        calls = []
        measure = ex.local_metrics
        ex.local_metrics = lambda: calls.append(1) or measure()
        results[evaluate] = ex.execute(AppConstants.TASK_TRAIN, _server_task(weights, "site-1"), FLContext(), Signal())
        assert len(calls) == int(evaluate)
    on = _check_outbound(results[True], set(weights), metrics, report)
    off = _check_outbound(results[False], set(weights), metrics, report - {local_key})
    for k in weights:  # the same training: only the report differs
        np.testing.assert_array_equal(on.data[k], off.data[k])


def test_site_policy_limits_what_leaves_the_site(tmp_path):
    ex = _executor(SegmentationExecutor, tmp_path, **SEG)
    ex.policy = parse_site_policy({"send_weight_differences": True}, "test policy")  # curves, local model: off
    weights = _numpy({"name": "unet"})
    result = ex.execute(AppConstants.TASK_TRAIN, _server_task(weights, "site-1"), FLContext(), Signal())
    dxo = _check_outbound(result, set(weights), DICE, SEG_REPORT, kind=DataKind.WEIGHT_DIFF)
    for k, v in dxo.data.items():  # the difference adds back up to the local model
        np.testing.assert_allclose(weights[k] + v, ex.local_weights[k], rtol=1e-5, atol=1e-6)
    reply = ex.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())
    assert reply.get_return_code() == ReturnCode.EMPTY_RESULT
    validated = from_shareable(ex.execute(AppConstants.TASK_VALIDATION, DXO(DataKind.WEIGHTS, data=weights)
                                          .to_shareable(), FLContext(), Signal()))
    assert validated.data_kind == DataKind.METRICS and set(validated.data) == DICE | {"n_images", "on_test_split"}
    with pytest.raises(ValueError, match="unknown keys"):
        parse_site_policy({"share_everything": True}, "p")
    with pytest.raises(ValueError, match="true or false"):
        parse_site_policy({"share_local_model": "yes"}, "p")
