"""Personalised segmentation (Ditto, FedLC, FedDP): the pure pieces, and what each job's executor sends and keeps."""

import copy

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from medflare.flare.executors import DittoExecutor, SegmentationExecutor
from jobspec import get_job
from medflare.keys import SITE_REPORT_KEY
from medflare.networks import build_model
from medflare.segmentation.networks import head_keys, norm_layer_keys
from medflare.algorithms.personalization import (PersonalHeadTrainer, ProximalPersonalTrainer, prediction_inconsistency,
                                                 proximal_pull, site_private_keys, weighted_dice_ce)
from medflare.segmentation.training import SegmentationTrainer
from toys import square_dataset

from test_executors import SMALL, _train_task

CPU = torch.device("cpu")


def _model(name="unet", seed=0, **kwargs):
    torch.manual_seed(seed)
    return build_model(name, spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), **kwargs)


def _numpy(model):
    return {k: v.detach().clone().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------------- pure pieces
def test_proximal_pull_is_the_closed_form_step():
    model, anchor = _model(seed=0), _model(seed=1)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    target = dict(anchor.named_parameters())
    proximal_pull(model, target, 0.0)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])
    proximal_pull(model, target, 3.0)  # (v + 3 a) / 4
    for k, v in model.named_parameters():
        torch.testing.assert_close(v, 0.25 * before[k] + 0.75 * target[k].detach())


def test_ditto_without_pull_is_local_training_and_with_infinite_pull_stays_global():
    data = square_dataset(12)
    plain = SegmentationTrainer(_model(seed=3), CPU, lr=0.05, optimizer="sgd")
    plain.fit(data, 2, 4, seed=5)
    free = ProximalPersonalTrainer(_model(seed=3), CPU, ditto_lambda=0.0, lr=0.05, optimizer="sgd")
    free.set_anchor(_model(seed=9).state_dict())
    free.fit(data, 2, 4, seed=5)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, free.model.state_dict()[k])  # lambda = 0: exactly the site's own training

    anchor = _model(seed=9).state_dict()
    held = ProximalPersonalTrainer(_model(seed=3), CPU, ditto_lambda=1e9, lr=0.05, optimizer="sgd")
    held.set_anchor(anchor)
    result = held.fit(data, 2, 4, seed=5)
    assert result.steps == 6
    for k, v in held.model.named_parameters():  # lambda -> inf: the personal model is the global one
        torch.testing.assert_close(v.detach(), anchor[k], atol=1e-6, rtol=0)

    with pytest.raises(RuntimeError, match="set_anchor"):
        ProximalPersonalTrainer(_model(), CPU).fit(data, 1, 4)
    with pytest.raises(ValueError, match="ditto_lambda"):
        ProximalPersonalTrainer(_model(), CPU, ditto_lambda=-1)


def test_private_keys_name_the_head_calibration_and_norm_layers():
    unet = _model()
    head = head_keys(unet)
    assert head and all(k.startswith("model.2.") for k in head)
    assert site_private_keys(unet, ["head"]) == head
    calibrated = _model("unet_calibrated")
    assert head_keys(calibrated) == head | {k for k in calibrated.state_dict()
                                            if k == "feature_gate" or k.startswith("calibration.")}
    affine = _model(norm=["instance", {"affine": True}])
    assert site_private_keys(affine, ["norm", "head"]) == norm_layer_keys(affine) | head_keys(affine)
    with pytest.raises(ValueError, match="local_norm needs"):
        site_private_keys(unet, ["norm"])
    with pytest.raises(ValueError, match="unknown site-local part"):
        site_private_keys(unet, ["decoder"])
    with pytest.raises(ValueError, match="needs a UNet"):
        site_private_keys(build_model("tiny_cnn", num_classes=2), ["head"])


def test_calibrated_unet_starts_as_the_plain_unet_and_learns_its_calibration():
    x = torch.randn(2, 1, 32, 32)
    plain, calibrated = _model(), _model("unet_calibrated")
    torch.testing.assert_close(plain(x), calibrated(x), atol=0, rtol=0)
    shared = {k: v for k, v in calibrated.state_dict().items() if k in plain.state_dict()}
    assert set(shared) == set(plain.state_dict())  # the UNet part keeps the UNet's names
    trainer = SegmentationTrainer(calibrated, CPU, lr=0.05, optimizer="sgd")
    trainer.fit(square_dataset(8), 1, 4)
    assert calibrated.feature_gate.abs().sum() > 0 and calibrated.calibration[2].weight.abs().sum() > 0


def test_weighted_dice_ce_with_unit_weights_is_monai_dice_ce():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 4, 16, 16), torch.randint(0, 4, (3, 1, 16, 16))
    expected = DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)
    torch.testing.assert_close(weighted_dice_ce(logits, labels, torch.ones(3, 1, 16, 16)), expected)
    weights = torch.ones(3, 1, 16, 16)
    weights[:, :, :8] = 3.0
    assert not torch.isclose(weighted_dice_ce(logits, labels, weights), expected)


def test_prediction_inconsistency():
    a = torch.tensor([[[[0.0, 10.0]], [[0.0, -10.0]]]])  # (1, 2, 1, 2): pixel 0 uncertain, pixel 1 sure of class 0
    assert torch.all(prediction_inconsistency(a, a) == 0)
    b = torch.tensor([[[[0.0, -10.0]], [[0.0, 10.0]]]])  # pixel 1 flips class, pixel 0 agrees
    u = prediction_inconsistency(a, b)
    assert u.shape == (1, 1, 1, 2)
    torch.testing.assert_close(u[0, 0, 0], torch.tensor([0.0, 1.0]))


def test_head_steps_hold_the_shared_layers_still():
    model = _model()
    private = site_private_keys(model, ["head"])
    trainer = PersonalHeadTrainer(model, CPU, private_keys=private, head_steps=3, lr=0.05, optimizer="sgd")
    before = _numpy(model)
    trainer.fit(square_dataset(12), 1, 4)  # 3 batches: all of them head-only
    after = _numpy(model)
    assert all(np.array_equal(before[k], after[k]) for k in after if k not in private)
    assert any(not np.array_equal(before[k], after[k]) for k in private)
    trainer.fit(square_dataset(16), 1, 4)  # 4 batches: the fourth trains the shared layers too
    assert any(not np.array_equal(after[k], v) for k, v in _numpy(model).items() if k not in private)


def test_inconsistency_weight_changes_the_loss_only_where_predictions_disagree():
    data = square_dataset(8)
    plain = PersonalHeadTrainer(_model(seed=2), CPU, private_keys=(), lr=0.05, optimizer="sgd")
    weighted = PersonalHeadTrainer(_model(seed=2), CPU, private_keys=(), inconsistency_weight=2.0, lr=0.05,
                                   optimizer="sgd")
    first = weighted.fit(data, 1, 8)  # one batch: the model still equals its reference, so u = 0
    plain_first = plain.fit(data, 1, 8)
    assert first.losses["seg"] == pytest.approx(plain_first.losses["seg"], rel=1e-5)
    weighted.start_round()
    for name, p in weighted._reference.named_parameters():  # the received model now disagrees with this one
        if name.startswith("model.2."):
            p.data += 0.5
    images = torch.stack([data[i]["image"] for i in range(8)])
    labels = torch.stack([data[i]["label"] for i in range(8)])
    reference = copy.deepcopy(weighted.model)
    with torch.no_grad():
        u = prediction_inconsistency(reference(images), weighted._reference(images))
        expected = float(weighted_dice_ce(reference(images), labels, 1.0 + 2.0 * u))
    assert weighted.training_step(images, labels)["seg"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------------- executors
def _job_executor(job, tmp_path, site="site-1"):
    spec = get_job(job)
    args = {k: v for k, v in spec.executor.args.items() if k != "synthetic"}
    cls = DittoExecutor if spec.executor.path.endswith("DittoExecutor") else SegmentationExecutor
    ex = cls(**{**args, **SMALL})
    ex.start(site, str(tmp_path))
    return ex


def _initial_weights(ex):
    return {k: v.numpy() for k, v in build_model(ex.model_name, **ex.model_args).state_dict().items()}


@pytest.mark.parametrize("job, kept", [("fedavg", lambda m: set()), ("fedbn", norm_layer_keys),
                                        ("fedbn_ft", norm_layer_keys), ("fedlc", head_keys), ("feddp", head_keys),
                                        ("ditto", norm_layer_keys)])
def test_exactly_the_shared_keys_leave_the_site(job, kept, tmp_path):
    ex = _job_executor(job, tmp_path)
    weights = _initial_weights(ex)
    result = ex.execute(AppConstants.TASK_TRAIN, _train_task(weights), FLContext(), Signal())
    kept_keys = kept(ex.model)
    assert (job == "fedavg") == (not kept_keys)
    sent = from_shareable(result).data
    assert set(sent) == set(weights) - kept_keys
    other = {k: v + 0.5 for k, v in weights.items()}
    second = ex.execute(AppConstants.TASK_TRAIN, _train_task(other, 1), FLContext(), Signal())
    assert set(from_shareable(second).data) == set(weights) - kept_keys
    if job == "ditto":  # the personal model is kept, never sent with the training result
        assert set(ex.personal_weights) == set(weights)
        assert not any(np.array_equal(ex.personal_weights[k], sent[k]) for k in sent if sent[k].size > 4)


def test_ditto_sends_what_fedbn_sends_and_deploys_its_personal_model(tmp_path):
    fedavg = _job_executor("fedbn", tmp_path / "fedbn")  # the ditto job's global part is FedBN
    ditto = _job_executor("ditto", tmp_path / "ditto")
    weights = _initial_weights(fedavg)
    for rnd in range(2):
        a = from_shareable(fedavg.execute(AppConstants.TASK_TRAIN, _train_task(weights, rnd), FLContext(), Signal()))
        b = from_shareable(ditto.execute(AppConstants.TASK_TRAIN, _train_task(weights, rnd), FLContext(), Signal()))
        assert set(a.data) == set(b.data)
        for k in a.data:  # the global part of Ditto is FedBN, bit for bit
            np.testing.assert_array_equal(a.data[k], b.data[k])
        weights = {k: 0.5 * (v + a.data[k]) if k in a.data else v for k, v in weights.items()}
    report = b.get_meta_prop(SITE_REPORT_KEY)
    assert 0.0 <= report["personal_dice"] <= 1.0 and 0.0 <= report["test_personal_dice"] <= 1.0
    submitted = from_shareable(ditto.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())).data
    for k, v in ditto.personal_weights.items():
        np.testing.assert_array_equal(submitted[k], v)
    assert not all(np.array_equal(submitted[k], ditto.local_weights[k]) for k in submitted)
    restarted = _job_executor("ditto", tmp_path / "ditto")  # as if FLARE restarted the worker
    again = from_shareable(restarted.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())).data
    for k, v in submitted.items():
        np.testing.assert_array_equal(again[k], v)


def test_local_head_options_are_checked():
    with pytest.raises(ValueError, match="local_head"):
        SegmentationExecutor(head_steps=5)
    with pytest.raises(ValueError, match="ditto_lambda"):
        DittoExecutor(ditto_lambda=-0.1)
    with pytest.raises(ValueError, match="finetune_epochs"):
        SegmentationExecutor(finetune_epochs=-1)
    with pytest.raises(ValueError, match="finetune_epochs"):
        DittoExecutor(finetune_epochs=3)


def test_finetuning_makes_the_personal_model_in_the_last_round_only(tmp_path):
    ex = _job_executor("fedbn_ft", tmp_path)
    ex.finetune_epochs = 2
    weights = _initial_weights(ex)
    first = from_shareable(ex.execute(AppConstants.TASK_TRAIN, _train_task(weights, 0), FLContext(), Signal()))
    assert ex.personal_weights is None and "personal_dice" not in first.get_meta_prop(SITE_REPORT_KEY)
    assert ex.deployed_model == "personal" and ex.deployed_weights() is None  # nothing to deploy yet
    shared = {**weights, **first.data}
    last = from_shareable(ex.execute(AppConstants.TASK_TRAIN, _train_task(shared, 1), FLContext(), Signal()))
    report = last.get_meta_prop(SITE_REPORT_KEY)
    assert report["deployed_model"] == "personal" and report["site_local_layers"] == "norm"
    assert 0.0 <= report["personal_dice"] <= 1.0
    # the personal model is the received model trained on: neither the update sent nor the model received
    assert any(not np.array_equal(ex.personal_weights[k], ex.local_weights[k]) for k in ex.local_weights)
    assert any(not np.array_equal(ex.personal_weights[k], shared[k]) for k in shared)
    restarted = _job_executor("fedbn_ft", tmp_path)  # as if FLARE restarted the worker
    submitted = from_shareable(restarted.execute(AppConstants.TASK_SUBMIT_MODEL, None, FLContext(), Signal())).data
    for k, v in ex.personal_weights.items():
        np.testing.assert_array_equal(submitted[k], v)
