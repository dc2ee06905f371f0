"""The executors, driven directly: what a site sends back, and state kept across worker restarts."""

import numbers

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.flare.executors import AdversarialAlignmentExecutor, SegmentationExecutor
from medflare.keys import PEER_SITE_KEY, SITE_REPORT_KEY
from medflare.segmentation.networks import FeatureUNet

SMALL = {"synthetic": {"n_train": 8, "n_val": 4, "n_test": 4}, "batch_size": 4}
DOMAIN_MODEL = {"name": "unet_domain", "n_domains": 3}
ALLOWED_META = {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS, SITE_REPORT_KEY}


def _executor(cls, tmp_path, site="site-1", **kwargs):
    ex = cls(**SMALL, **kwargs)
    ex.start(site, str(tmp_path))
    return ex


def _train_task(weights, round_num=0, peer=None):
    dxo = DXO(DataKind.WEIGHTS, data=weights)
    if peer is not None:
        dxo = DXO(DataKind.COLLECTION, data={"global": dxo, "peer_encoder": DXO(DataKind.WEIGHTS, data=peer[1])},
                  meta={PEER_SITE_KEY: peer[0]})
    s = dxo.to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, round_num)
    s.set_header(AppConstants.NUM_ROUNDS, 2)
    return s


def _global_weights(model=None):
    from medflare.networks import build_model

    return {k: v.numpy() for k, v in build_model(**(model or {"name": "unet"})).state_dict().items()}


def _assert_only_weights_and_scalars(result, expected_keys):
    dxo = from_shareable(result)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert set(dxo.data) == expected_keys  # exactly the segmentation model: no discriminator, no features
    assert all(isinstance(v, np.ndarray) for v in dxo.data.values())
    meta = {k: v for k, v in dxo.meta.items() if not k.startswith("__")}
    assert set(meta) <= ALLOWED_META, set(meta) - ALLOWED_META
    assert isinstance(meta[MetaKey.NUM_STEPS_CURRENT_ROUND], int)
    for group in (meta[MetaKey.INITIAL_METRICS], meta[SITE_REPORT_KEY]):
        for key, value in group.items():
            assert isinstance(value, (numbers.Number, str)), f"{key} is {type(value)}"
    return dxo


@pytest.mark.parametrize("cls,args", [(SegmentationExecutor, {}),
                                      (AdversarialAlignmentExecutor, {"mode": "target"}),
                                      (AdversarialAlignmentExecutor, {"mode": "domain", "model": DOMAIN_MODEL})],
                         ids=["segmentation", "fedda-target", "fedda-domain"])
def test_train_sends_only_weights_and_declared_scalars(cls, args, tmp_path):
    ex = _executor(cls, tmp_path, **args)
    weights = _global_weights(args.get("model"))
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    dxo = _assert_only_weights_and_scalars(result, set(weights))
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 8
    assert 0.0 <= dxo.get_meta_prop(MetaKey.INITIAL_METRICS)["dice"] <= 1.0
    report = dxo.get_meta_prop(SITE_REPORT_KEY)
    assert report["modality"] == "t1" and report["n_test"] == 4 and 0.0 <= report["test_dice"] <= 1.0
    if args.get("mode") == "domain":
        assert 0.0 <= report["domain_acc"] <= 1.0 and "train_head" in report


def test_domain_mode_needs_the_domain_model_and_a_known_site(tmp_path):
    ex = _executor(AdversarialAlignmentExecutor, tmp_path, mode="domain")
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(_global_weights()), FLContext(), Signal())
    assert result.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "unet_domain" in ex._setup_error
    ex = _executor(AdversarialAlignmentExecutor, tmp_path, site="hospital-a", mode="domain", model=DOMAIN_MODEL,
                   domain_sites=["hospital-b", "hospital-c", "hospital-d"])
    with pytest.raises(Exception, match="hospital-a"):
        ex.domain_index(3)
    with pytest.raises(ValueError, match="mode"):
        AdversarialAlignmentExecutor(mode="joint")


def test_cyclic_payload_uses_peer_encoder(tmp_path):
    ex = _executor(AdversarialAlignmentExecutor, tmp_path, mode="target", warmup_rounds=0)
    net = FeatureUNet()
    peer = {k: v.numpy() + 1.0 for k, v in net.state_dict().items() if k in net.encoder_keys()}
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(_global_weights(), 1, ("site-3", peer)),
                        FLContext(), Signal())
    _assert_only_weights_and_scalars(result, set(net.state_dict()))
    target = ex.trainer.target_encoder.state_dict()
    for k, v in peer.items():
        np.testing.assert_allclose(target[k].numpy(), v)
    assert "train_adv" in from_shareable(result).get_meta_prop(SITE_REPORT_KEY)


def test_state_survives_a_new_worker(tmp_path):
    first = _executor(AdversarialAlignmentExecutor, tmp_path, mode="target")
    first.execute(AppConstants.TASK_TRAIN, _train_task(_global_weights()), FLContext(), Signal())
    disc = {k: v.clone() for k, v in first.trainer.discriminator.state_dict().items()}
    second = _executor(AdversarialAlignmentExecutor, tmp_path, mode="target")  # as if FLARE restarted the worker
    submitted = second.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())
    local = from_shareable(submitted).data
    for k, v in first.local_weights.items():
        np.testing.assert_array_equal(local[k], v)
    assert second.rounds_done == 1
    for k, v in second.trainer.discriminator.state_dict().items():
        assert np.array_equal(v.numpy(), disc[k].numpy())


def test_validate_and_unknown_task(tmp_path):
    ex = _executor(SegmentationExecutor, tmp_path)
    res = ex.execute(AppConstants.TASK_VALIDATION, DXO(DataKind.WEIGHTS, data=_global_weights()).to_shareable(),
                     FLContext(), Signal())
    metrics = from_shareable(res)
    assert metrics.data_kind == DataKind.METRICS and set(metrics.data) >= {"dice", "dice_organ", "dice_lesion"}
    assert ex.execute("nonsense", None, FLContext(), Signal()).get_return_code() == ReturnCode.TASK_UNKNOWN
    assert ex.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal()).get_return_code() == \
        ReturnCode.EMPTY_RESULT


def test_mismatched_global_model_is_reported(tmp_path):
    ex = _executor(SegmentationExecutor, tmp_path)
    bad = {k: v for k, v in _global_weights().items() if not k.startswith("model.2")}
    res = ex.execute(AppConstants.TASK_TRAIN, _train_task(bad), FLContext(), Signal())
    assert res.get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_unknown_site_fails_every_task(tmp_path):
    ex = _executor(SegmentationExecutor, tmp_path, site="hospital-x")
    for _ in range(2):
        res = ex.execute(AppConstants.TASK_TRAIN, _train_task(_global_weights()), FLContext(), Signal())
        assert res.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "unknown site 'hospital-x'" in ex._setup_error


def test_3d_pipeline(tmp_path):
    """The same executor trains a 3D UNet on the 3D variant of the benchmark."""
    ex = SegmentationExecutor(spatial_dims=3, spatial_size=(32, 32, 32), batch_size=2,
                              synthetic={"n_train": 4, "n_val": 2, "size": 32},
                              model={"channels": (8, 16), "strides": (2,)})
    ex.start("site-2", str(tmp_path))
    net = FeatureUNet(spatial_dims=3, channels=(8, 16), strides=(2,))
    weights = {k: v.numpy() for k, v in net.state_dict().items()}
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    dxo = _assert_only_weights_and_scalars(result, set(weights))
    assert dxo.data["model.0.conv.unit0.conv.weight"].ndim == 5
    for k, v in weights.items():
        assert dxo.data[k].shape == v.shape and dxo.data[k].dtype == v.dtype, k
        assert np.all(np.isfinite(dxo.data[k])), k
    changed = [k for k, v in weights.items() if v.dtype.kind == "f" and not np.array_equal(dxo.data[k], v)]
    assert "model.0.conv.unit0.conv.weight" in changed  # local training moved the weights
    report = dxo.get_meta_prop(SITE_REPORT_KEY)
    assert report["modality"] == "t2" and report["n_train"] == 4
    assert 0.0 < report["train_loss"] < 10.0 and 0.0 <= report["test_dice"] <= 1.0
    assert 0.0 <= dxo.get_meta_prop(MetaKey.INITIAL_METRICS)["dice"] <= 1.0
    net.load_state_dict({k: torch.as_tensor(v) for k, v in dxo.data.items()})
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)  # a 3D logit map per class


def test_fedprox_reports_its_term_and_keeps_the_local_model_near_the_global_one(tmp_path):
    """Same seed and data: with ``fedprox_mu > 0`` the site reports a positive proximal term and its trained
    weights end much closer to the global weights than with ``fedprox_mu = 0``."""
    torch.manual_seed(0)
    start = _global_weights()
    drift, reports = {}, {}
    for mu in (0.0, 100.0):
        ex = _executor(SegmentationExecutor, tmp_path / f"mu{mu}", fedprox_mu=mu)
        dxo = from_shareable(ex.execute(AppConstants.TASK_TRAIN, _train_task(start), FLContext(), Signal()))
        drift[mu] = sum(float(np.sum((dxo.data[k] - v) ** 2)) for k, v in start.items() if v.dtype.kind == "f")
        reports[mu] = dxo.get_meta_prop(SITE_REPORT_KEY)
    assert "train_prox" not in reports[0.0] and reports[100.0]["train_prox"] > 0
    assert 0 < drift[100.0] < 0.5 * drift[0.0], drift


def test_local_model_is_not_changed_by_later_validation(tmp_path):
    ex = _executor(SegmentationExecutor, tmp_path)
    ex.execute(AppConstants.TASK_TRAIN, _train_task(_global_weights()), FLContext(), Signal())
    before = {k: v.copy() for k, v in ex.local_weights.items()}
    other = {k: v + 1.0 if v.dtype.kind == "f" else v for k, v in _global_weights().items()}
    ex.execute(AppConstants.TASK_VALIDATION, DXO(DataKind.WEIGHTS, data=other).to_shareable(), FLContext(), Signal())
    submitted = from_shareable(ex.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())).data
    for k, v in before.items():
        np.testing.assert_array_equal(submitted[k], v)


AFFINE = {"name": "unet", "norm": ["instance", {"affine": True}]}


def test_local_norm_never_sends_normalisation_layers_and_restores_them(tmp_path):
    from medflare.networks import build_model
    from medflare.segmentation.networks import norm_layer_keys

    ex = _executor(SegmentationExecutor, tmp_path, model=AFFINE, local_norm=True)
    weights = _global_weights(AFFINE)
    norm_keys = norm_layer_keys(build_model(**AFFINE))
    assert norm_keys and all(k.endswith(("weight", "bias")) for k in norm_keys)
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    _assert_only_weights_and_scalars(result, set(weights) - norm_keys)
    own = {k: ex.local_weights[k].copy() for k in norm_keys}
    assert any(not np.array_equal(own[k], weights[k]) for k in norm_keys)  # the site's norms did train
    # the next global model (whatever its norm entries) is used with the site's own norm layers
    other = {k: (v + 0.5 if k in norm_keys else v) for k, v in weights.items()}
    ex.execute(AppConstants.TASK_TRAIN, _train_task(other, 1), FLContext(), Signal())
    assert set(from_shareable(result).data).isdisjoint(norm_keys)
    res = ex.execute(AppConstants.TASK_VALIDATION, _validate_task(other, "SRV_FL_global_model.pt"), FLContext(),
                     Signal())
    assert from_shareable(res).data_kind == DataKind.METRICS
    state = ex.model.state_dict()
    for k in norm_keys:  # the global model was scored with this site's norm layers, not the server's values
        np.testing.assert_array_equal(state[k].numpy(), ex.local_weights[k])
    with pytest.raises(ValueError, match="local_norm needs"):
        plain = _executor(SegmentationExecutor, tmp_path / "plain", local_norm=True)
        plain._ensure_ready(FLContext())
        plain.site_local_keys()


def _validate_task(weights, owner):
    s = DXO(DataKind.WEIGHTS, data=weights).to_shareable()
    s.set_header(AppConstants.MODEL_OWNER, owner)
    return s


def test_statistics_mode_sends_its_statistics_and_uses_the_peers(tmp_path):
    from medflare.keys import FEATURE_STATS_KEY, PEER_FEATURE_STATS_KEY

    ex = _executor(AdversarialAlignmentExecutor, tmp_path, site="site-2", mode="stats", warmup_rounds=0)
    weights = _global_weights()
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    dxo = from_shareable(result)
    assert set(dxo.data) == set(weights)  # the discriminator stays at the site
    stats = dxo.get_meta_prop(FEATURE_STATS_KEY)
    assert np.asarray(stats["mean"]).shape == (3, 64) and np.asarray(stats["var"]).shape == (3, 64)
    assert len(stats["count"]) == 3
    assert ex.trainer.peers == {}  # nothing to align with in the first round
    task = _train_task(weights, 1)
    inner = from_shareable(task)
    inner.set_meta_prop(PEER_FEATURE_STATS_KEY, {"site-1": stats, "site-3": stats})
    inner.update_shareable(task)
    result = ex.execute(AppConstants.TASK_TRAIN, task, FLContext(), Signal())
    assert sorted(ex.trainer.peers) == [0, 2]
    assert "train_adv" in from_shareable(result).get_meta_prop(SITE_REPORT_KEY)
    task = _train_task(weights, 2)  # statistics of a site outside the federation stop the site, naming it
    inner = from_shareable(task)
    inner.set_meta_prop(PEER_FEATURE_STATS_KEY, {"site-9": stats})
    inner.update_shareable(task)
    res = ex.execute(AppConstants.TASK_TRAIN, task, FLContext(), Signal())
    assert res.get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_first_local_norm_keeps_only_the_input_layer_s_norm(tmp_path):
    from medflare.networks import build_model
    from medflare.segmentation.networks import norm_layer_keys

    net = build_model(**AFFINE)
    first = norm_layer_keys(net, first_only=True)
    assert len(first) == 2 and first < norm_layer_keys(net)
    ex = _executor(SegmentationExecutor, tmp_path, model=AFFINE, local_norm="first")
    weights = _global_weights(AFFINE)
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    assert set(from_shareable(result).data) == set(weights) - first
    with pytest.raises(ValueError, match="local_norm"):
        SegmentationExecutor(local_norm="all")
