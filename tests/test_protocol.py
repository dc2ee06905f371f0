"""The evaluation protocol and training options: test split, stability summary, learning-rate schedule,
optimiser reset, the run summary's test section, the linear probe and domain-adversarial alignment."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from medflare.algorithms.alignment import DomainAdversarialTrainer, confusion_loss, domain_accuracy
from medflare.data import ImageSpec
from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.data import load_site_data
from medflare.data.site_config import SiteDataConfig
from medflare.segmentation.synthetic import make_site_arrays, write_site_dataset
from medflare.flare.executors.base import configure_torch
from medflare.segmentation.networks import DomainHeadUNet, FeatureUNet
from medflare.networks import build_model
from probe import linear_probe_accuracy
from medflare.common.results import RunSummary, held_out_summary
from medflare.common.summaries import round_stability
from medflare.segmentation.training import SegmentationTrainer, round_lr
from toys import square_dataset


# ---------------------------------------------------------------------------------------------- data splits


def test_synthetic_test_split_is_new_data_and_leaves_other_splits_unchanged():
    cfg = SyntheticSegConfig(modalities=("t1", "ct"), n_train=3, n_val=2, n_test=4)
    train, _ = make_site_arrays(cfg, 0, "train")
    val, _ = make_site_arrays(cfg, 0, "val")
    test, test_labels = make_site_arrays(cfg, 0, "test")
    assert test.shape == (4, 64, 64) and test_labels.shape == (4, 64, 64)
    for other in (train, val):
        assert not any(np.array_equal(t, o) for t in test for o in other)
    # the train and validation images do not depend on how many test images there are
    again = SyntheticSegConfig(modalities=("t1", "ct"), n_train=3, n_val=2, n_test=1)
    assert np.array_equal(make_site_arrays(again, 0, "train")[0], train)
    assert np.array_equal(make_site_arrays(again, 0, "val")[0], val)
    with pytest.raises(ValueError, match="split must be"):
        make_site_arrays(cfg, 0, "holdout")


def test_ellipses_variant_differs_and_default_fingerprint_is_stable():
    blobs = SyntheticSegConfig(modalities=("t1",), n_train=2, n_val=1, n_test=1)
    ellipses = SyntheticSegConfig(modalities=("t1",), n_train=2, n_val=1, n_test=1, variant="ellipses")
    assert blobs.fingerprint() != ellipses.fingerprint()
    x_b, y_b = make_site_arrays(blobs, 0, "train")
    x_e, y_e = make_site_arrays(ellipses, 0, "train")
    assert not np.array_equal(y_b, y_e)
    assert set(np.unique(y_e)) <= {0, 1, 2} and (y_e == 1).any()
    assert 0.0 <= x_e.min() and x_e.max() <= 1.0
    with pytest.raises(ValueError, match="unknown synthetic variant"):
        SyntheticSegConfig(variant="stars")


def test_datalist_test_list_is_loaded_and_its_absence_is_explained(tmp_path):
    cfg = SyntheticSegConfig(modalities=("t2",), n_train=2, n_val=2, n_test=3)
    written = write_site_dataset(cfg, 0, str(tmp_path / "site"))
    spec = ImageSpec()
    site = SiteDataConfig(site="h1", source="test", datalist=written.datalist)
    data = load_site_data(site, spec, cfg)
    assert len(data.test) == 3 and data.test_note == ""
    with open(written.datalist) as f:
        raw = json.load(f)
    del raw["test"]
    with open(written.datalist, "w") as f:
        json.dump(raw, f)
    data = load_site_data(site, spec, cfg)
    assert data.test is None
    assert "no 'test' list" in data.test_note and "h1" in data.test_note


# ---------------------------------------------------------------------------------------------- summaries


def test_round_stability():
    st = round_stability([0.1, 0.5, 0.6, 0.4, 0.7, 0.65, 0.66])
    assert st["last5_mean"] == pytest.approx(np.mean([0.6, 0.4, 0.7, 0.65, 0.66]))
    assert st["last5_max_change"] == pytest.approx(0.3)
    assert round_stability([0.5])["last5_max_change"] == 0.0
    with pytest.raises(ValueError):
        round_stability([])


def _round(r, sites):
    return {"round": r, "sites": {s: {"dice": v[0], "test_dice": v[1]} for s, v in sites.items()}}


def test_test_section_reports_test_figures_and_the_final_models():
    rounds = [_round(r, {"a": (0.9, 0.1 * r), "b": (0.8, 0.05 * r)}) for r in range(6)]
    cross = {"matrix": {"global": {"a": 0.7, "b": 0.5}, "best_global": {"a": 0.6, "b": 0.6}},
             "validation_only_sites": []}
    out = held_out_summary(rounds, cross)
    assert out["split"] == "test"
    assert out["global"] == {"mean": pytest.approx(0.6), "worst": 0.5}
    assert out["best_global"]["mean"] == pytest.approx(0.6)
    assert [c["round"] for c in out["rounds"]] == [0, 1, 2, 3, 4, 5, 6] and out["rounds"][-1]["model"] == "final"
    # last five global models: received in rounds 2..5 and the final one
    means = [0.075 * r for r in (2, 3, 4, 5)] + [0.6]
    assert out["last5"]["mean"] == pytest.approx(np.mean(means))
    assert out["last5"]["worst"] == pytest.approx(np.mean([0.05 * r for r in (2, 3, 4, 5)] + [0.5]))


def test_test_section_falls_back_to_validation_and_says_so():
    rounds = [{"round": 0, "sites": {"a": {"dice": 0.5, "test_dice": 0.4}, "b": {"dice": 0.3}}}]
    out = held_out_summary(rounds, None)
    assert out["rounds"][0]["sites"] == {"a": 0.4, "b": 0.3}
    assert "validation at ['b']" in out["split"]


def test_run_summary_writes_the_test_section(tmp_path):
    summary = RunSummary(str(tmp_path))
    summary.add_round(0, {"site-1": {"dice": 0.2, "test_dice": 0.25}})
    summary.set_cross_site({"site-1": {"SRV_FL_global_model.pt": {"dice": 0.5, "on_test_split": 1.0}}})
    with open(tmp_path / "metrics" / "metrics_summary.json") as f:
        data = json.load(f)
    assert data["test"]["global"] == {"mean": 0.5, "worst": 0.5}
    assert data["test"]["matrix"] == {"global": {"site-1": 0.5}}
    assert data["test"]["last5"]["n_models"] == 2


# ---------------------------------------------------------------------------------------------- training options


def test_round_lr_cosine_decays_to_the_floor():
    assert round_lr(0.1, "constant", 7, 10) == 0.1
    assert round_lr(0.1, "cosine", 0, 10) == pytest.approx(0.1)
    assert round_lr(0.1, "cosine", 9, 10) == pytest.approx(0.01)
    values = [round_lr(0.1, "cosine", r, 10) for r in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="lr_schedule"):
        round_lr(0.1, "step", 0, 10)


def test_reset_optimizer_starts_each_round_without_moments():
    torch.manual_seed(0)
    net = FeatureUNet(out_channels=2, channels=(4, 8), strides=(2,))
    trainer = SegmentationTrainer(net, torch.device("cpu"), lr=1e-2, reset_optimizer=True)
    trainer.fit(square_dataset(8), 1, 4)
    assert trainer.optimizer.state  # moments after a round
    trainer.start_round()
    assert not trainer.optimizer.state
    kept = SegmentationTrainer(FeatureUNet(out_channels=2, channels=(4, 8), strides=(2,)), torch.device("cpu"),
                               reset_optimizer=False)
    kept.fit(square_dataset(8), 1, 4)
    kept.start_round()
    assert kept.optimizer.state
    with pytest.raises(ValueError, match="optimizer must be"):
        SegmentationTrainer(net, torch.device("cpu"), optimizer="rmsprop")


def test_configure_torch_defaults_to_one_thread(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("MEDFLARE_NUM_THREADS", raising=False)
        assert configure_torch(0, 0) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("MEDFLARE_NUM_THREADS", "2")
        assert configure_torch(0, 0) == 2
        assert configure_torch(1, 0) == 1
        monkeypatch.setenv("MEDFLARE_NUM_THREADS", "many")
        with pytest.raises(ValueError, match="MEDFLARE_NUM_THREADS"):
            configure_torch(0, 0)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- alignment


def test_linear_probe_separates_separable_features_and_not_noise():
    rs = np.random.RandomState(0)
    labels = np.repeat([0, 1, 2], 40)
    separable = rs.normal(size=(120, 8)) + 3.0 * np.eye(3, 8)[labels]
    noise = rs.normal(size=(120, 8))
    assert linear_probe_accuracy(separable, labels) > 0.95
    assert linear_probe_accuracy(noise, labels) < 0.6
    with pytest.raises(ValueError):
        linear_probe_accuracy(noise, np.zeros(120))


def test_confusion_loss_is_minimal_for_uniform_predictions():
    uniform = torch.zeros(4, 3)
    confident = torch.tensor([[5.0, 0.0, 0.0]] * 4)
    assert float(confusion_loss(uniform)) == pytest.approx(math.log(3))
    assert float(confusion_loss(confident)) > math.log(3)


def test_domain_head_unet_starts_like_the_plain_unet():
    torch.manual_seed(3)
    plain = FeatureUNet(out_channels=2, channels=(4, 8), strides=(2,))
    torch.manual_seed(3)
    with_head = build_model("unet_domain", n_domains=3, out_channels=2, channels=(4, 8), strides=(2,))
    head_keys = {k for k in with_head.state_dict() if k.startswith("domain_")}
    assert head_keys and set(with_head.state_dict()) - head_keys == set(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(v, with_head.state_dict()[k])
    assert with_head.encoder_keys() == plain.encoder_keys()


def _pair(adv_weight):
    torch.manual_seed(1)
    model = DomainHeadUNet(n_domains=2, out_channels=2, channels=(4, 8), strides=(2,))
    return DomainAdversarialTrainer(model, torch.device("cpu"), 1, adv_weight=adv_weight, lr=0.05,
                                    optimizer="sgd", reset_optimizer=True)


def test_domain_training_with_zero_weight_leaves_segmentation_weights_as_plain_training():
    data = square_dataset(8)
    adversarial = _pair(0.0)
    adversarial.fit(data, 1, 4, seed=5)
    torch.manual_seed(1)
    plain_model = FeatureUNet(out_channels=2, channels=(4, 8), strides=(2,))
    plain = SegmentationTrainer(plain_model, torch.device("cpu"), lr=0.05, optimizer="sgd", reset_optimizer=True)
    plain.fit(data, 1, 4, seed=5)
    for k, v in plain_model.state_dict().items():
        assert torch.allclose(v, adversarial.model.state_dict()[k], atol=1e-6), k
    # ...while the domain head took its round step and the standardisation statistics were set
    assert not torch.equal(adversarial.model.domain_head.weight, _pair(0.0).model.domain_head.weight)
    assert 0.0 <= domain_accuracy(adversarial.model, data, 1, torch.device("cpu")) <= 1.0
    assert not torch.equal(adversarial.model.domain_var, torch.ones_like(adversarial.model.domain_var))


def test_domain_head_takes_one_gradient_step_per_round_at_the_received_head():
    """The head's round update is -head_lr x its gradient at the received model, so the server's average of the
    sites' heads is one gradient step of the K-way head on all sites' features together."""
    data = square_dataset(8)
    trainer = _pair(0.0)
    received = copy.deepcopy(trainer.model)
    trainer.fit(data, 1, 8, seed=5)  # one batch holding every image
    images = torch.stack([d["image"] for d in data])
    received.domain_head.zero_grad()
    torch.nn.functional.cross_entropy(received.domain_logits(received.encode(images)),
                                      torch.full((8,), 1)).backward()
    for name, param in received.domain_head.named_parameters():
        expected = param.detach() - trainer.head_lr * param.grad
        assert torch.allclose(trainer.model.domain_head.state_dict()[name], expected, atol=1e-5), name


def test_domain_confusion_changes_the_encoder_and_reports_its_terms():
    data = square_dataset(8)
    trainer = _pair(1.0)
    result = trainer.fit(data, 1, 4, seed=5)
    assert {"seg", "head", "adv", "head_acc", "loss"} <= set(result.losses)
    reference = _pair(0.0)
    reference.fit(data, 1, 4, seed=5)
    enc = next(iter(sorted(trainer.model.encoder_keys())))
    assert not torch.allclose(trainer.model.state_dict()[enc], reference.model.state_dict()[enc])


def test_domain_trainer_refuses_models_without_head_and_bad_index():
    with pytest.raises(TypeError, match="unet_domain"):
        DomainAdversarialTrainer(FeatureUNet(out_channels=2, channels=(4, 8), strides=(2,)), torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="outside"):
        DomainAdversarialTrainer(DomainHeadUNet(n_domains=2, out_channels=2, channels=(4, 8), strides=(2,)),
                                 torch.device("cpu"), 2)


def test_paired_difference_interval():
    from paired_stats import paired_difference, t_quantile_975

    d = paired_difference([0.6, 0.7, 0.65, 0.62, 0.68], [0.5, 0.55, 0.6, 0.5, 0.6])
    diffs = np.array([0.1, 0.15, 0.05, 0.12, 0.08])
    half = 2.776 * diffs.std(ddof=1) / math.sqrt(5)
    assert d["diff"] == pytest.approx(diffs.mean())
    assert (d["low"], d["high"]) == (pytest.approx(diffs.mean() - half), pytest.approx(diffs.mean() + half))
    assert d["significant"] == 1.0
    noisy = paired_difference([0.6, 0.4, 0.7], [0.5, 0.5, 0.5])
    assert noisy["low"] < 0 < noisy["high"] and noisy["significant"] == 0.0
    assert paired_difference([0.6], [0.5])["significant"] == 0.0
    assert t_quantile_975(22) == 2.086 and t_quantile_975(500) == 1.96
    with pytest.raises(ValueError):
        paired_difference([0.1, 0.2], [0.1])
