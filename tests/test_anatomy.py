"""The ``anatomy`` variant of the built-in benchmark: brain tissue on the MNI152 template, one contrast per site."""

import hashlib
import json
import os

import numpy as np
import pytest

from medflare.data import ImageSpec, resolve_site_config
from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.data import load_site_data
from medflare.segmentation.anatomy import ANATOMY_MODALITIES, TISSUES, sample_case, template_tissues
from medflare.segmentation.synthetic import make_site_arrays, write_site_dataset
from medflare.flare.executors.segmentation import resolve_classes


def small(**changes):
    settings = dict(modalities=("t1", "t2", "ct"), n_train=4, n_val=2, n_test=2, size=48, variant="anatomy")
    return SyntheticSegConfig(**{**settings, **changes})


def test_template_tissue_maps_are_probabilities():
    tissue, centre, (lo, hi) = template_tissues()
    assert tissue.shape[0] == len(TISSUES)
    total = tissue.sum(axis=0)
    assert np.allclose(total, 1.0, atol=1e-4)
    assert tissue.min() >= 0.0
    # CSF, GM and WM each take a sizeable part of the brain
    brain = tissue[3:].sum()
    for k in (3, 4, 5):
        assert 0.1 < tissue[k].sum() / brain < 0.6
    assert np.all(lo < centre) and np.all(centre < hi)


def test_labels_shapes_and_classes_2d_and_3d():
    cfg = small()
    x, y = make_site_arrays(cfg, 0, "train")
    assert x.shape == (4, 48, 48) and y.shape == (4, 48, 48) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == {0, 1, 2, 3}
    assert cfg.num_classes == 4 and cfg.label_names == {"0": "background", "1": "csf", "2": "gm", "3": "wm"}
    for img in y:  # every slice cuts through the brain: grey and white matter take a good part of it
        assert (img == 2).mean() > 0.05 and (img == 3).mean() > 0.05
    x3, y3 = make_site_arrays(small(spatial_dims=3, size=32, n_train=1), 0, "train")
    assert x3.shape == (1, 32, 32, 32) and set(np.unique(y3)) == {0, 1, 2, 3}


def test_splits_and_sites_share_no_case():
    cfg = small(n_train=6, n_val=3, n_test=3)
    seen = {}
    for site in range(3):
        for split in ("train", "val", "test"):
            _, labels = make_site_arrays(cfg, site, split)
            for i, lab in enumerate(labels):
                digest = hashlib.sha1(lab.tobytes()).hexdigest()
                assert digest not in seen, f"{(site, split, i)} repeats {seen[digest]}"
                seen[digest] = (site, split, i)


def tissue_means(image, label):
    return {c: float(image[label == c].mean()) for c in (1, 2, 3)}


@pytest.mark.parametrize("modality,order", [
    ("t1", (3, 2, 1)),     # WM > GM > CSF
    ("t2", (1, 2, 3)),     # CSF > GM > WM
    ("flair", (2, 3, 1)),  # GM > WM > CSF (fluid suppressed)
    ("pd", (2, 1, 3)),     # GM > CSF > WM
    ("ct", (2, 3, 1)),     # GM > WM > CSF, small differences
])
def test_each_modality_orders_tissues_like_the_real_one(modality, order):
    cfg = SyntheticSegConfig(modalities=(modality,), n_train=6, n_val=1, n_test=1, size=64, variant="anatomy")
    x, y = make_site_arrays(cfg, 0, "train")
    means = [tissue_means(img, lab) for img, lab in zip(x, y)]
    avg = {c: np.mean([m[c] for m in means]) for c in (1, 2, 3)}
    assert avg[order[0]] > avg[order[1]] > avg[order[2]], avg
    if modality == "ct":  # low soft-tissue contrast: brain tissues within a small band, bone brightest
        assert avg[order[0]] - avg[order[2]] < 0.35
        assert x.max(axis=(1, 2)).min() > 0.9


def test_ct_contrast_is_lower_than_mr_contrast():
    def grey_white_contrast(modality):
        cfg = SyntheticSegConfig(modalities=(modality,), n_train=4, n_val=1, n_test=1, size=64, variant="anatomy")
        x, y = make_site_arrays(cfg, 0, "train")
        return np.mean([abs(tissue_means(i, l)[2] - tissue_means(i, l)[3]) for i, l in zip(x, y)])

    assert grey_white_contrast("ct") < grey_white_contrast("t1")


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    cfg = small(modalities=("t2",), n_train=2, n_val=1, n_test=1)

    def digest(folder):
        h = hashlib.sha1()
        for root, _, files in sorted(os.walk(folder)):
            for name in sorted(files):
                if name.endswith(".nii.gz") or name == "dataset.json":
                    with open(os.path.join(root, name), "rb") as f:
                        h.update(name.encode() + f.read())
        return h.hexdigest()

    a = write_site_dataset(cfg, 0, str(tmp_path / "a"))
    b = write_site_dataset(cfg, 0, str(tmp_path / "b"))
    assert digest(a.root) == digest(b.root)
    c = write_site_dataset(small(modalities=("t2",), n_train=2, n_val=1, n_test=1, seed=1), 0, str(tmp_path / "c"))
    assert digest(a.root) != digest(c.root)
    assert os.path.isfile(os.path.join(a.root, "preview.png"))
    with open(a.datalist) as f:
        raw = json.load(f)
    assert raw["labels"] == {"0": "background", "1": "csf", "2": "gm", "3": "wm"}


def test_site_sizes_settable_per_site_and_loaded_through_the_datalist_loader(tmp_path):
    cfg = small(n_train=4, site_n_train=(4, 4, 2))
    assert [len(make_site_arrays(cfg, k, "train")[0]) for k in range(3)] == [4, 4, 2]
    assert cfg.fingerprint() != small(n_train=4).fingerprint()
    spec = ImageSpec(num_classes=4, spatial_size=(48, 48))
    data = load_site_data(resolve_site_config("site-3", None, cfg.modalities), spec, cfg, cache_dir=str(tmp_path))
    assert len(data.train) == 2 and data.modality == "ct"
    assert data.train[0]["image"].shape == (1, 48, 48)
    with pytest.raises(ValueError, match="one count"):
        small(site_n_train=(4, 4))


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="unknown synthetic modality"):
        small(modalities=("t1", "pet"))
    with pytest.raises(ValueError, match="size must be"):
        small(size=40)
    with pytest.raises(ValueError, match="unknown synthetic modality"):
        SyntheticSegConfig(modalities=("pd",))  # PD exists in the anatomy variant only


def test_executor_classes_follow_the_benchmark_unless_given():
    assert resolve_classes(small(), None, None) == (4, ["background", "csf", "gm", "wm"])
    assert resolve_classes(SyntheticSegConfig(), None, None) == (3, ["background", "organ", "lesion"])
    assert resolve_classes(small(), 2, None) == (2, ["background", "class1"])
    assert resolve_classes(small(), None, ["bg", "tumour"]) == (2, ["bg", "tumour"])
    with pytest.raises(ValueError, match="do not name"):
        resolve_classes(small(), 3, ["bg", "tumour"])


def test_cases_differ_like_subjects():
    rs = np.random.RandomState(0)
    a, b = sample_case(64, 2, rs), sample_case(64, 2, rs)
    assert a.shape == (len(TISSUES), 64, 64)
    assert float((a - b).abs().mean()) > 0.01
    assert set(ANATOMY_MODALITIES) == {"t1", "t2", "flair", "pd", "ct"}
