"""Synthetic quality-shift benchmark, classifiers, metrics and local training (medflare.classification)."""

import json

import numpy as np
import pytest
import torch

from medflare.classification import synthetic as syn
from medflare.classification.data import load_cls_site_data, synthetic_config
from medflare.flare.fairness_workflow import classification_round_report, fairness_rows
from medflare.data.placement import TensorDictDataset
from medflare.classification.training import (ClassificationTrainer, balanced_accuracy,
                                              classification_metrics, evaluate_classifier, macro_auc)
from medflare.data import DataError
from medflare.networks import build_model

SMALL = syn.SyntheticClsConfig(n_train=24, n_val=8, n_test=8, size=32)


def test_generator_is_deterministic_and_seeded():
    x1, y1 = syn.make_site_arrays(SMALL, 1, "train")
    x2, y2 = syn.make_site_arrays(SMALL, 1, "train")
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.shape == (24, 1, 32, 32) and x1.dtype == np.float32 and y1.dtype == np.int64
    x3, _ = syn.make_site_arrays(syn.SyntheticClsConfig(n_train=24, n_val=8, n_test=8, size=32, seed=1), 1, "train")
    assert not np.allclose(x1, x3)
    xv, _ = syn.make_site_arrays(SMALL, 1, "val")
    assert not any(np.allclose(xv[0], x) for x in x1)  # validation images differ from training images


def test_qualities_degrade_the_image():
    rs = np.random.RandomState(0)
    clean = syn.render_clean(2, rs, 64)
    hf = {}
    for q in ("hq", "blur", "lowres", "noisy", "gauss3"):
        img = syn.degrade(clean, q, np.random.RandomState(1))
        assert img.mean() == pytest.approx(0.0, abs=1e-4) and img.std() == pytest.approx(1.0, abs=1e-3)
        hf[q] = float(np.abs(np.diff(img, axis=1)).mean())  # high-frequency energy
    assert hf["blur"] < hf["hq"] and hf["lowres"] < hf["hq"] and hf["noisy"] > hf["hq"] and hf["gauss3"] > hf["hq"]
    assert syn.is_known_quality("gauss5") and not syn.is_known_quality("gauss6")
    with pytest.raises(ValueError):
        syn.SyntheticClsConfig(qualities=("hq", "fog"))


def test_paper_setting_dirichlet_partition():
    cfg = syn.paper_setting(n_clients=20, n_corrupted=4, severity=3, alpha=1.0, n_train=40)
    assert cfg.qualities[:16] == ("hq",) * 16 and cfg.qualities[16:] == ("gauss3",) * 4
    counts = syn.partition_counts(cfg)
    assert counts.shape == (20, 4) and counts.sum() == 40 * 20
    assert counts.sum(axis=1).min() >= cfg.min_train
    np.testing.assert_array_equal(counts.sum(axis=0), [200, 200, 200, 200])  # every label used once
    # each class is split between the groups in proportion to their size (16:4)
    np.testing.assert_array_equal(counts[16:].sum(axis=0), [40, 40, 40, 40])
    assert len({tuple(c / c.sum()) for c in counts}) > 1  # label mixes differ between sites
    np.testing.assert_array_equal(counts, syn.partition_counts(cfg))
    labels = syn.site_labels(cfg, 3, "train")
    np.testing.assert_array_equal(np.bincount(labels, minlength=4), counts[3])
    assert cfg.corrupted_qualities == ("gauss3",)
    assert synthetic_config({"n_clients": 6, "n_corrupted": 2, "n_train": 16}).qualities[-2:] == ("gauss3",) * 2


def test_global_test_is_the_same_images_clean_and_corrupted():
    t = syn.make_global_test(SMALL)
    assert t["clean"].shape == t["corrupted"].shape == (8, 1, 32, 32)
    assert not np.allclose(t["clean"], t["corrupted"])
    assert SMALL.corrupted_qualities == ("blur", "noisy", "lowres")


def test_site_data_cache_and_site_config(tmp_path, monkeypatch):
    data = load_cls_site_data("site-2", None, SMALL, cache_dir=str(tmp_path))
    assert data.quality == "blur" and len(data.train) == 24 and len(data.val) == 8
    assert sorted(data.global_test) == ["clean", "corrupted"] and sum(data.class_counts) == 24
    again = load_cls_site_data("site-2", None, SMALL, cache_dir=str(tmp_path))
    torch.testing.assert_close(again.train.images, data.train.images)
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"sites": {"hospital-a": {"synthetic": {"quality": "lowres"}}}}))
    monkeypatch.setenv("MEDFLARE_SITE_CONFIG", str(config))
    assert load_cls_site_data("hospital-a", None, SMALL, cache_dir=str(tmp_path)).quality == "lowres"
    with pytest.raises(DataError, match="hospital-b"):
        load_cls_site_data("hospital-b", None, SMALL, cache_dir=str(tmp_path))
    monkeypatch.delenv("MEDFLARE_SITE_CONFIG")
    with pytest.raises(DataError, match="site-9"):
        load_cls_site_data("site-9", None, SMALL, cache_dir=str(tmp_path))


def test_metrics_by_hand():
    labels = np.array([0, 0, 0, 1])
    logits = np.array([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    m = classification_metrics(labels, logits)
    assert m["acc"] == pytest.approx(0.75) and m["bacc"] == pytest.approx((2 / 3 + 1) / 2)
    assert macro_auc(np.array([0, 0, 1, 1]), np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])) == 1.0
    assert macro_auc(np.array([0, 1]), np.array([[0.5, 0.5], [0.5, 0.5]])) == 0.5  # ties
    assert macro_auc(np.array([1, 1]), np.array([[0.5, 0.5], [0.2, 0.8]])) is None
    assert "auc" not in classification_metrics(np.array([1, 1]), np.zeros((2, 2)))


def _pairwise_auc(labels, probs, c):
    """One-vs-rest AUC of class ``c`` by its definition: the share of (positive, negative) pairs ranked right,
    ties counted half."""
    pos, neg = probs[labels == c, c], probs[labels != c, c]
    right = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return right / (len(pos) * len(neg))


@pytest.mark.parametrize("present", [[0, 1, 2, 3], [0, 2, 3], [1, 3]])
def test_macro_auc_is_the_mean_pairwise_auc_of_the_classes_present(present):
    rs = np.random.RandomState(len(present))
    labels = rs.choice(present, 60)
    probs = np.round(rs.dirichlet(np.ones(4), 60), 1)  # rounded: many ties within a class's scores
    expected = np.mean([_pairwise_auc(labels, probs, c) for c in present])
    assert macro_auc(labels, probs) == pytest.approx(expected, rel=1e-12)


def test_balanced_accuracy_by_hand_for_indices_and_names():
    # class 0: 1 of 2 right, class 2: 2 of 3 right, class 1 predicted but absent from the labels (not averaged)
    assert balanced_accuracy([0, 0, 2, 2, 2], [0, 1, 2, 2, 1]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert balanced_accuracy(["NV", "NV", "NV", "MEL"], ["NV", "NV", "MEL", "MEL"]) == pytest.approx((1 + 2 / 3) / 2)
    assert balanced_accuracy(np.array([3]), np.array([3])) == 1.0
    with pytest.raises(ValueError):
        balanced_accuracy([0, 1], [0])


@pytest.mark.parametrize("name", ["tiny_cnn", "densenet121", "resnet18"])
def test_registered_classifiers(name):
    model = build_model(name, in_channels=1, num_classes=4)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize("optimizer", ["adam", "gsam"])
def test_tiny_cnn_learns_the_clean_task(optimizer, tmp_path):
    """A few epochs on clean images beat chance clearly on held-out images (both optimisers)."""
    cfg = syn.SyntheticClsConfig(qualities=("hq",), n_train=160, n_val=64, n_test=0, size=48)
    arrays = syn.load_site_arrays(cfg, 0, str(tmp_path))
    torch.manual_seed(0)
    model = build_model("tiny_cnn")
    trainer = ClassificationTrainer(model, torch.device("cpu"), syn.class_counts(arrays["train_y"]), lr=3e-3,
                                    optimizer=optimizer, rho=0.05)
    train = TensorDictDataset.from_arrays(arrays["train_x"], arrays["train_y"])
    val = TensorDictDataset.from_arrays(arrays["val_x"], arrays["val_y"])
    before = evaluate_classifier(model, val, torch.device("cpu"))
    result = trainer.fit(train, 6, 32)
    after = evaluate_classifier(model, val, torch.device("cpu"))
    assert result.steps == 6 * 5 and after["bacc"] > 0.5 and after["bacc"] > before["bacc"] + 0.15, after
    if optimizer == "gsam":
        assert result.losses["loss_perturbed"] >= result.losses["loss"] - 0.05


def test_round_report_and_rows():
    sites = {"a": {"bacc": 0.9, "auc": 0.95, "test_clean_bacc": 0.8, "test_corrupted_bacc": 0.6},
             "b": {"bacc": 0.5, "auc": 0.7}}
    report = classification_round_report(sites)
    assert report["fairness_auc"]["worst_site"] == "b"
    assert report["global_test"]["clean_corrupted_gap"] == pytest.approx(0.2)
    rows = fairness_rows([{"round": 0, "fairness": {"mean": 0.7, "worst": 0.5, "worst_site": "b", "std": 0.2,
                                                    "gap": 0.4, "jain": 0.9}, **report}])
    assert rows[0]["bacc_gap"] == 0.4 and rows[0]["test_clean_corrupted_gap"] == pytest.approx(0.2)


def test_site_test_split_is_new_data_and_leaves_train_and_val_unchanged():
    from medflare.classification.synthetic import SyntheticClsConfig, make_site_arrays

    cfg = SyntheticClsConfig(qualities=("hq", "blur"), n_train=6, n_val=4, n_site_test=5, n_test=0)
    tx, _ = make_site_arrays(cfg, 1, "train")
    vx, _ = make_site_arrays(cfg, 1, "val")
    sx, sy = make_site_arrays(cfg, 1, "test")
    assert sx.shape == (5, 1, 64, 64) and sy.shape == (5,)
    assert not any(np.array_equal(a, b) for a in sx for b in np.concatenate([tx, vx]))
    other = SyntheticClsConfig(qualities=("hq", "blur"), n_train=6, n_val=4, n_site_test=2, n_test=0)
    assert np.array_equal(make_site_arrays(other, 1, "train")[0], tx)
    assert np.array_equal(make_site_arrays(other, 1, "val")[0], vx)


def test_classifier_fresh_optimizer_per_round():
    from medflare.classification.models import TinyCNN
    from medflare.classification.training import ClassificationTrainer
    from medflare.data.placement import TensorDictDataset

    data = TensorDictDataset.from_arrays(np.random.RandomState(0).normal(size=(8, 1, 32, 32)).astype(np.float32),
                        np.array([0, 1, 2, 3] * 2))
    trainer = ClassificationTrainer(TinyCNN(), torch.device("cpu"), [2, 2, 2, 2], reset_optimizer=True)
    trainer.fit(data, 1, 4)
    first = trainer.optimizer
    trainer.fit(data, 1, 4)
    assert trainer.optimizer is not first and trainer.gsam.base_optimizer is trainer.optimizer
    kept = ClassificationTrainer(TinyCNN(), torch.device("cpu"), [2, 2, 2, 2])
    kept.fit(data, 1, 4)
    first = kept.optimizer
    kept.fit(data, 1, 4)
    assert kept.optimizer is first
