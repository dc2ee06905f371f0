"""FedDA's statistics design (per-class feature statistics, virtual peer features, the site discriminator) and the
GIN intensity augmentation: values checked against independent computations."""

import numpy as np
import pytest
import torch

from medflare.segmentation.augment import RandomIntensityNetwork, make_intensity_augmentation, rescale_like
from medflare.algorithms.feature_stats import (FeatureStatistics, StatisticsAlignmentTrainer, class_feature_sums,
                                               flatten_locations, location_classes, sample_peer_features,
                                               site_feature_statistics)
from medflare.segmentation.networks import FeatureUNet
from medflare.segmentation.training import SegmentationTrainer


def test_location_classes_take_the_majority_class_of_each_region():
    labels = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    labels[0, 0, :2, :2] = 1          # top-left region: all class 1
    labels[0, 0, 2:, 2:] = 2          # bottom-right: all class 2
    labels[0, 0, 0, 2] = 1            # top-right: 1 of 4 pixels class 1 -> background (3 of 4)
    labels[0, 0, 2, 0] = 1
    labels[0, 0, 3, 1] = 2            # bottom-left: two background, one 1, one 2 -> no majority above 0.5
    classes = location_classes(labels, (2, 2), 3)
    assert classes.tolist() == [[[1, 0], [-1, 2]]]


def test_class_statistics_equal_numpy_means_and_variances():
    rs = np.random.RandomState(0)
    vectors = torch.as_tensor(rs.normal(size=(50, 3)), dtype=torch.float32)
    classes = torch.as_tensor(rs.randint(0, 2, size=50))
    stats = FeatureStatistics.from_sums(*class_feature_sums(vectors, classes, 3))
    for c in (0, 1):
        part = vectors.numpy()[classes.numpy() == c]
        np.testing.assert_allclose(stats.mean[c], part.mean(axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var[c], part.var(axis=0), rtol=1e-4, atol=1e-6)
        assert stats.count[c] == len(part)
    assert stats.count[2] == 0


def test_flatten_locations_keeps_channel_vectors_of_classified_locations():
    features = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    classes = torch.tensor([[[0, -1], [1, 1]], [[-1, -1], [-1, 2]]])
    vectors, cls = flatten_locations(features, classes)
    assert cls.tolist() == [0, 1, 1, 2]
    assert vectors[0].tolist() == features[0, :, 0, 0].tolist()
    assert vectors[3].tolist() == features[1, :, 1, 1].tolist()


def test_site_statistics_of_a_model_match_a_direct_computation():
    torch.manual_seed(0)
    model = FeatureUNet(out_channels=3)
    images = torch.rand(4, 1, 32, 32)
    labels = torch.randint(0, 3, (4, 1, 32, 32))
    labels[:, :, :16] = 1
    dataset = [{"image": images[i], "label": labels[i]} for i in range(4)]
    stats = site_feature_statistics(model, dataset, 3, torch.device("cpu"), batch_size=3)
    with torch.no_grad():
        model.eval()
        feats = model.encode(images)
    cls = location_classes(labels, feats.shape[2:], 3)
    vectors, c = flatten_locations(feats, cls)
    np.testing.assert_allclose(stats.mean[1], vectors[c == 1].mean(dim=0).numpy(), rtol=1e-4, atol=1e-5)


def test_peer_samples_follow_the_peer_gaussians_and_skip_unseen_classes():
    peer = FeatureStatistics(mean=np.array([[0.0, 0.0], [5.0, -5.0]], np.float32),
                             var=np.array([[1.0, 1.0], [0.25, 4.0]], np.float32),
                             count=np.array([0.0, 100.0], np.float32))
    classes = torch.ones(20000, dtype=torch.long)
    classes[:10] = 0  # class 0 was never seen by the peer: no draws for it
    vectors, cls, sites = sample_peer_features({2: peer}, classes, torch.Generator().manual_seed(0))
    assert len(vectors) == 19990 and set(cls.tolist()) == {1} and set(sites.tolist()) == {2}
    np.testing.assert_allclose(vectors.mean(dim=0).numpy(), [5.0, -5.0], atol=0.05)
    np.testing.assert_allclose(vectors.std(dim=0).numpy(), [0.5, 2.0], rtol=0.03)


def test_statistics_reports_round_trip_and_bad_ones_are_refused():
    stats = FeatureStatistics(np.ones((2, 3), np.float32), np.ones((2, 3), np.float32), np.array([1.0, 2.0]))
    back = FeatureStatistics.from_report(stats.to_report(), "site-2")
    np.testing.assert_array_equal(back.mean, stats.mean)
    bad = stats.to_report()
    bad["mean"][0][0] = float("nan")
    with pytest.raises(ValueError, match="site-2.*NaN"):
        FeatureStatistics.from_report(bad, "site-2")
    with pytest.raises(ValueError, match="inconsistent shapes"):
        FeatureStatistics.from_report({"mean": [[1.0]], "var": [[1.0, 2.0]], "count": [1.0]}, "site-3")
    with pytest.raises(ValueError, match="malformed"):
        FeatureStatistics.from_report({"mean": [[1.0]]}, "site-3")


def batch_set(n=8, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, size, size, generator=g)
    labels = (images > 0.5).long() + (images > 0.8).long()
    return [{"image": images[i], "label": labels[i]} for i in range(n)]


def test_alignment_trainer_without_peers_or_with_zero_weight_trains_like_plain_segmentation():
    data = batch_set()
    weights = []
    for make in (lambda m: SegmentationTrainer(m, torch.device("cpu"), lr=0.01, optimizer="sgd"),
                 lambda m: StatisticsAlignmentTrainer(m, torch.device("cpu"), 0, 3, 3, lr=0.01, optimizer="sgd")):
        torch.manual_seed(0)
        trainer = make(FeatureUNet(out_channels=3))
        trainer.fit(data, 1, 4, seed=1)
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
    # with peers but weight 0 the segmentation weights still follow plain training (the discriminator trains aside)
    torch.manual_seed(0)
    trainer = StatisticsAlignmentTrainer(FeatureUNet(out_channels=3), torch.device("cpu"), 0, 3, 3, adv_weight=0.0,
                                         lr=0.01, optimizer="sgd")
    peer = site_feature_statistics(trainer.model, batch_set(seed=5), 3, torch.device("cpu"))
    trainer.set_peer_statistics({1: peer, 2: peer, 0: peer})
    assert sorted(trainer.peers) == [1, 2]
    result = trainer.fit(data, 1, 4, seed=1)
    assert "disc_acc" in result.losses
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[0][k]), k


def test_confusion_moves_own_features_towards_the_peers():
    """With a large weight, the own site's class means move towards the peer's (which are far away)."""
    data = batch_set(n=16)
    torch.manual_seed(0)
    trainer = StatisticsAlignmentTrainer(FeatureUNet(out_channels=3), torch.device("cpu"), 0, 2, 3, adv_weight=2.0,
                                         lr=0.01, optimizer="sgd", disc_hidden=0)
    own = site_feature_statistics(trainer.model, data, 3, torch.device("cpu"))
    peer = FeatureStatistics(own.mean + 1.0, own.var, own.count)
    trainer.set_peer_statistics({1: peer})
    for rnd in range(4):
        trainer.fit(data, 1, 8, seed=rnd)
    after = site_feature_statistics(trainer.model, data, 3, torch.device("cpu"))
    seen = own.count > 0
    before_gap = np.abs(own.mean[seen] - peer.mean[seen]).mean()
    after_gap = np.abs(after.mean[seen] - peer.mean[seen]).mean()
    assert after_gap < before_gap


def test_gin_keeps_shapes_and_range_changes_contrast_and_is_reproducible():
    images = torch.rand(4, 1, 16, 16)
    gin = RandomIntensityNetwork(prob=1.0, generator=torch.Generator().manual_seed(3))
    out = gin(images)
    assert out.shape == images.shape
    np.testing.assert_allclose(out.flatten(1).min(dim=1).values, images.flatten(1).min(dim=1).values, atol=1e-5)
    np.testing.assert_allclose(out.flatten(1).max(dim=1).values, images.flatten(1).max(dim=1).values, atol=1e-5)
    assert not torch.allclose(out, images)
    again = RandomIntensityNetwork(prob=1.0, generator=torch.Generator().manual_seed(3))(images)
    assert torch.equal(out, again)
    assert make_intensity_augmentation("none") is None
    with pytest.raises(ValueError, match="intensity_augmentation"):
        make_intensity_augmentation("mixup")
    skip = RandomIntensityNetwork(prob=0.0)
    assert torch.equal(skip(images), images)


def test_rescale_like_maps_to_the_reference_range():
    x = torch.tensor([[[0.0, 2.0, 4.0]]])
    ref = torch.tensor([[[1.0, 1.5, 3.0]]])
    assert rescale_like(x, ref).tolist() == [[[1.0, 2.0, 3.0]]]
