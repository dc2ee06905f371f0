import json
import os

import numpy as np
import pytest

from medflare.segmentation.synthetic import (MODALITIES, SyntheticSegConfig, ensure_site_dataset, make_site_arrays,
                                             write_benchmark)

SMALL = SyntheticSegConfig(n_train=12, n_val=6)


def test_deterministic_and_seeded():
    a_img, a_lab = make_site_arrays(SMALL, 0, "train")
    b_img, b_lab = make_site_arrays(SMALL, 0, "train")
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    c_img, c_lab = make_site_arrays(SyntheticSegConfig(n_train=12, n_val=6, seed=1), 0, "train")
    assert not np.array_equal(a_lab, c_lab)
    v_img, v_lab = make_site_arrays(SMALL, 0, "val")
    assert not np.array_equal(a_lab[: len(v_lab)], v_lab)  # train and validation are drawn independently


def test_shapes_and_labels_2d_and_3d():
    img, lab = make_site_arrays(SMALL, 2, "train")
    assert img.shape == (12, 64, 64) and lab.shape == (12, 64, 64)
    assert img.dtype == np.float32 and 0.0 <= img.min() and img.max() <= 1.0
    assert set(np.unique(lab)) <= {0, 1, 2}
    assert (lab == 2).any() and (lab == 1).any()
    # lesions lie inside the organ: every lesion pixel would be organ if lesions were removed
    cfg3 = SyntheticSegConfig(spatial_dims=3, size=32, n_train=2, n_val=1)
    img3, lab3 = make_site_arrays(cfg3, 0, "train")
    assert img3.shape == (2, 32, 32, 32) and set(np.unique(lab3)) <= {0, 1, 2}


def test_same_anatomy_distribution_across_sites():
    """Label statistics do not depend on the modality: only the rendering does."""
    fractions = []
    for k in range(len(SMALL.modalities)):
        _, lab = make_site_arrays(SyntheticSegConfig(n_train=60, n_val=1), k, "train")
        fractions.append(np.bincount(lab.ravel(), minlength=3) / lab.size)
    fractions = np.array(fractions)
    assert np.all(fractions.max(0) - fractions.min(0) < 0.05)


def _class_means(img, lab):
    return np.array([img[lab == c].mean() for c in range(3)])


def test_tissue_ordering_differs_between_modalities():
    orders = {}
    for k, mod in enumerate(SMALL.modalities):
        img, lab = make_site_arrays(SMALL, k, "train")
        orders[mod] = tuple(np.argsort(-_class_means(img, lab)))  # classes from brightest to darkest
    assert orders["t1"] == (1, 2, 0)     # organ > lesion > background
    assert orders["t2"] == (2, 1, 0)     # lesion > organ > background
    assert orders["ct"] == (2, 0, 1)     # lesion > background > organ
    assert orders["flair"] == (1, 0, 2)  # organ > background > lesion
    assert len(set(orders.values())) == len(orders)


def _nearest_mean_dice(train_k, test_k):
    """Dice of an intensity-only classifier (nearest class mean) fit on site ``train_k``, tested on ``test_k``."""
    cfg = SyntheticSegConfig(n_train=20, n_val=20)
    img, lab = make_site_arrays(cfg, train_k, "train")
    means = _class_means(img, lab)
    t_img, t_lab = make_site_arrays(cfg, test_k, "val")
    pred = np.argmin(np.abs(t_img[..., None] - means), axis=-1)
    dices = []
    for c in (1, 2):
        inter = np.sum((pred == c) & (t_lab == c))
        dices.append(2 * inter / (np.sum(pred == c) + np.sum(t_lab == c) + 1e-8))
    return float(np.mean(dices))


def test_modality_shift_is_real():
    """Intensity rules learnt on one modality transfer within the modality but fail on another."""
    in_site = _nearest_mean_dice(0, 0)
    t1_to_ct = _nearest_mean_dice(0, 2)
    ct_to_t1 = _nearest_mean_dice(2, 0)
    assert in_site > 0.45
    assert t1_to_ct < in_site - 0.25 and ct_to_t1 < in_site - 0.25


def test_writer_and_cache(tmp_path):
    sites = write_benchmark(SMALL, str(tmp_path), sites=[1])
    with open(sites[0].datalist) as f:
        data = json.load(f)
    assert len(data["training"]) == 12 and len(data["validation"]) == 6
    assert data["modality"] == {"0": "T2"} and data["labels"]["2"] == "lesion"
    assert os.path.isfile(os.path.join(sites[0].root, data["training"][0]["image"]))
    first = ensure_site_dataset(SMALL, 0, str(tmp_path / "cache"))
    mtime = os.path.getmtime(first.datalist)
    again = ensure_site_dataset(SMALL, 0, str(tmp_path / "cache"))
    assert again.datalist == first.datalist and os.path.getmtime(again.datalist) == mtime


@pytest.mark.parametrize("kwargs", [{"modalities": ("t1", "pet")}, {"size": 16}, {"spatial_dims": 4}])
def test_bad_benchmark_settings(kwargs):
    with pytest.raises(ValueError):
        SyntheticSegConfig(**kwargs)


def test_all_modalities_registered():
    assert set(SMALL.modalities) == set(MODALITIES)
