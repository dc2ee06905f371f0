import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from medflare.segmentation.metrics import add_dice, dice_metric, evaluate_segmentation
from medflare.common.summaries import fairness_summary


def _numpy_dice(pred, target, num_classes):
    """Per-image, per-foreground-class Dice; a class absent from both prediction and truth scores 1."""
    scores = np.zeros((len(pred), num_classes - 1))
    for i in range(len(pred)):
        for c in range(1, num_classes):
            p, t = pred[i] == c, target[i] == c
            denom = p.sum() + t.sum()
            scores[i, c - 1] = 1.0 if denom == 0 else 2.0 * (p & t).sum() / denom
    return scores.mean(axis=0)


class FixedLogits(torch.nn.Module):
    """Returns precomputed logits for a batch, in order, regardless of the input values."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.pos = logits, 0

    def forward(self, x):
        out = self.logits[self.pos:self.pos + x.shape[0]]
        self.pos += x.shape[0]
        return out


def test_dice_matches_numpy_and_monai():
    rs = np.random.RandomState(0)
    n, c = 7, 3
    labels = rs.randint(0, c, size=(n, 1, 12, 12))
    labels[3] = 0  # an image without foreground
    logits = torch.as_tensor(rs.normal(size=(n, c, 12, 12)), dtype=torch.float32)
    logits[3] = torch.tensor([5.0, 0.0, 0.0])[:, None, None]  # predicts background everywhere: both empty
    ds = Dataset([{"image": torch.zeros(1, 12, 12), "label": torch.as_tensor(labels[i])} for i in range(n)])
    res = evaluate_segmentation(FixedLogits(logits), ds, c, torch.device("cpu"), batch_size=3,
                                class_names=["bg", "organ", "lesion"])
    pred = logits.argmax(1).numpy()
    expected = _numpy_dice(pred, labels[:, 0], c)
    assert res["dice_organ"] == pytest.approx(expected[0], abs=1e-6)
    assert res["dice_lesion"] == pytest.approx(expected[1], abs=1e-6)
    assert res["dice"] == pytest.approx(expected.mean(), abs=1e-6)
    assert res["n_images"] == n
    monai = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=False)
    monai(one_hot(torch.as_tensor(pred[:, None]), c), one_hot(torch.as_tensor(labels), c))
    np.testing.assert_allclose(monai.aggregate().numpy(), expected, atol=1e-6)


def test_dice_metric_by_hand():
    metric = dice_metric(3)
    # image 1: class 1 has 1 of its 2 pixels found (Dice 2/3), class 2 is missed (0); image 2 has no foreground and
    # predicts none, so both classes score 1
    add_dice(metric, torch.tensor([[[[1, 0], [0, 0]]]]), torch.tensor([[[[1, 1], [0, 2]]]]), 3)
    add_dice(metric, torch.zeros(1, 1, 2, 2, dtype=torch.long), torch.zeros(1, 1, 2, 2), 3)
    np.testing.assert_allclose(metric.get_buffer().numpy(), [[2 / 3, 0.0], [1.0, 1.0]], atol=1e-6)
    np.testing.assert_allclose(metric.aggregate().numpy(), [5 / 6, 0.5], atol=1e-6)


def test_perfect_and_wrong_predictions():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[0, 2:5, 2:5] = 1
    perfect = torch.nn.functional.one_hot(label[0], 2).permute(2, 0, 1).float()[None] * 10
    ds = Dataset([{"image": torch.zeros(1, 8, 8), "label": label}])
    assert evaluate_segmentation(FixedLogits(perfect), ds, 2, torch.device("cpu"))["dice"] == pytest.approx(1.0)
    assert evaluate_segmentation(FixedLogits(-perfect), ds, 2, torch.device("cpu"))["dice"] == pytest.approx(0.0)


def test_fairness_summary_known_values():
    s = fairness_summary({"a": 0.9, "b": 0.5, "c": 0.7})
    assert s["mean"] == pytest.approx(0.7)
    assert s["worst"] == 0.5 and s["worst_site"] == "b" and s["best"] == 0.9
    assert s["gap"] == pytest.approx(0.4)
    assert s["std"] == pytest.approx(np.std([0.9, 0.5, 0.7]))
    assert s["jain"] == pytest.approx(2.1 ** 2 / (3 * (0.81 + 0.25 + 0.49)))
    assert fairness_summary({"a": 0.6, "b": 0.6})["jain"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\['b'\]"):
        fairness_summary({"a": 0.6, "b": float("nan")})
