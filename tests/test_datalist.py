"""Datalist loading and the bad-input errors of the data layer (each must name the file or site at fault)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from medflare.data import DataError, ImageSpec, resolve_site_config
from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.data import load_site_data
from medflare.data.datalist import load_items, read_datalist
from medflare.data.site_config import SITE_CONFIG_ENV, SITE_CONFIG_FILE
from medflare.segmentation.synthetic import write_benchmark

SMALL = SyntheticSegConfig(n_train=6, n_val=3)
SPEC = ImageSpec()


@pytest.fixture
def site_dir(tmp_path):
    return write_benchmark(SMALL, str(tmp_path), sites=[0])[0]


def _rewrite(datalist, mutate):
    with open(datalist) as f:
        data = json.load(f)
    mutate(data)
    with open(datalist, "w") as f:
        json.dump(data, f)


def test_load_synthetic_datalist(site_dir):
    items = read_datalist(site_dir.datalist, "training")
    ds = load_items(items, SPEC)
    assert len(ds) == 6
    item = ds[0]
    assert item["image"].shape == (1, 64, 64) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, 64, 64) and item["label"].dtype == torch.long
    assert float(item["image"].min()) == 0.0 and float(item["image"].max()) == pytest.approx(1.0)
    lazy = load_items(items, SPEC, cache=False)
    assert torch.equal(lazy[0]["image"], item["image"])


def test_resize_and_zscore(site_dir):
    entries = read_datalist(site_dir.datalist, "validation")
    raw = nib.load(entries[0]["image"]).get_fdata()
    # z-score per channel over the whole image (background included, population std), before any resize
    native = load_items(entries, ImageSpec(intensity="zscore"))[0]["image"]
    assert float(native.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(native.std(unbiased=False)) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(native[0].numpy(), (raw - raw.mean()) / raw.std(), atol=1e-5)
    item = load_items(entries, ImageSpec(spatial_size=(32, 48), intensity="zscore"))[0]
    assert item["image"].shape == (1, 32, 48) and item["label"].shape == (1, 32, 48)
    # area resizing averages neighbouring pixels: the mean stays near 0, the spread shrinks a little
    assert abs(float(item["image"].mean())) < 0.02 and 0.9 < float(item["image"].std(unbiased=False)) <= 1.0
    assert set(torch.unique(item["label"]).tolist()) <= {0, 1, 2}


def test_png_and_3d_nifti(tmp_path):
    from PIL import Image

    img = (np.random.RandomState(0).rand(40, 40) * 255).astype(np.uint8)
    lab = np.zeros((40, 40), np.uint8)
    lab[10:20, 10:20] = 1
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(lab).save(tmp_path / "a_seg.png")
    vol = np.random.RandomState(1).rand(20, 20, 20).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii.gz"))
    nib.save(nib.Nifti1Image((vol > 0.5).astype(np.uint8), np.eye(4)), str(tmp_path / "v_seg.nii.gz"))
    dl = tmp_path / "list.json"
    dl.write_text(json.dumps({"training": [{"image": "a.png", "label": "a_seg.png"}],
                              "validation": [{"image": "v.nii.gz", "label": "v_seg.nii.gz"}]}))
    png = load_items(read_datalist(str(dl), "training"), ImageSpec(num_classes=2))[0]
    assert png["image"].shape == (1, 64, 64) and int(png["label"].sum()) > 0
    vol3 = load_items(read_datalist(str(dl), "validation"),
                      ImageSpec(num_classes=2, spatial_dims=3, spatial_size=(16, 16, 16)))[0]
    assert vol3["image"].shape == (1, 16, 16, 16)


# ---------------------------------------------------------------- bad input


def test_missing_image_names_file(site_dir):
    missing = os.path.join(site_dir.root, "imagesTr", "train_0003.nii.gz")
    os.remove(missing)
    with pytest.raises(DataError, match="train_0003.nii.gz"):
        read_datalist(site_dir.datalist, "training")


def test_shape_mismatch_names_both_files(site_dir):
    path = os.path.join(site_dir.root, "labelsTr", "train_0001.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((60, 64), np.uint8), np.eye(4)), path)
    with pytest.raises(DataError, match=r"shape mismatch.*imagesTr/train_0001.*labelsTr/train_0001"):
        load_items(read_datalist(site_dir.datalist, "training"), SPEC)


def test_label_outside_classes_names_file(site_dir):
    path = os.path.join(site_dir.root, "labelsTr", "train_0002.nii.gz")
    lab = np.zeros((64, 64), np.uint8)
    lab[5, 5] = 7
    nib.save(nib.Nifti1Image(lab, np.eye(4)), path)
    with pytest.raises(DataError, match=r"train_0002.nii.gz: label values \[7\] outside the declared classes 0..2"):
        load_items(read_datalist(site_dir.datalist, "training"), SPEC)


def test_label_outside_classes_detected_lazily_too(site_dir):
    path = os.path.join(site_dir.root, "labelsTr", "train_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.full((64, 64), 3, np.uint8), np.eye(4)), path)
    ds = load_items(read_datalist(site_dir.datalist, "training"), SPEC, cache=False)
    with pytest.raises(DataError, match="train_0000.nii.gz: label values"):
        ds[0]


def test_empty_datalist_names_file(site_dir):
    _rewrite(site_dir.datalist, lambda d: d.update(training=[]))
    with pytest.raises(DataError, match=r"dataset.json: the 'training' list is empty"):
        read_datalist(site_dir.datalist, "training")


def test_missing_split_and_bad_entry(site_dir):
    _rewrite(site_dir.datalist, lambda d: d.pop("validation"))
    with pytest.raises(DataError, match="has no 'validation' list"):
        read_datalist(site_dir.datalist, "validation")
    _rewrite(site_dir.datalist, lambda d: d["training"].__setitem__(0, {"image": "x.nii.gz"}))
    with pytest.raises(DataError, match="entry 0 needs 'image' and 'label'"):
        read_datalist(site_dir.datalist, "training")


def test_unknown_site_without_config():
    with pytest.raises(DataError, match="unknown site 'hospital-a'"):
        resolve_site_config("hospital-a", None, SMALL.modalities)
    with pytest.raises(DataError, match="unknown site 'site-7'"):
        resolve_site_config("site-7", None, SMALL.modalities)


def test_unknown_site_in_keyed_config(tmp_path, monkeypatch):
    cfg = tmp_path / "sites.json"
    cfg.write_text(json.dumps({"sites": {"site-1": {"synthetic": {"modality": "t1"}}}}))
    monkeypatch.setenv(SITE_CONFIG_ENV, str(cfg))
    with pytest.raises(DataError, match=r"unknown site 'site-2': .*sites.json lists only \['site-1'\]"):
        resolve_site_config("site-2", None, SMALL.modalities)


def test_site_config_errors_are_clear(tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"datalist": "a.json", "colour": "red"}))
    with pytest.raises(DataError, match=r"unknown keys \['colour'\] for site 'site-1'"):
        resolve_site_config("site-1", str(local), SMALL.modalities)
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"synthetic": {"modality": "pet"}}))
    with pytest.raises(DataError, match="synthetic modality 'pet'"):
        resolve_site_config("site-1", str(local), SMALL.modalities)


def test_local_config_beats_env_and_resolves_relative_paths(site_dir, tmp_path, monkeypatch):
    local = tmp_path / "local"
    local.mkdir()
    rel = os.path.relpath(site_dir.datalist, str(local))
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"datalist": rel, "modality": "t1"}))
    env_cfg = tmp_path / "env.json"
    env_cfg.write_text(json.dumps({"synthetic": {"modality": "ct"}}))
    monkeypatch.setenv(SITE_CONFIG_ENV, str(env_cfg))
    cfg = resolve_site_config("hospital-a", str(local), SMALL.modalities)
    assert cfg.datalist == os.path.normpath(os.path.join(str(local), rel)) or os.path.samefile(cfg.datalist, site_dir.datalist)
    data = load_site_data(cfg, SPEC, SMALL)
    assert len(data.train) == 6 and data.modality == "t1"
    assert resolve_site_config("hospital-b", None, SMALL.modalities).synthetic_modality == "ct"


def test_load_site_data_prefixes_site_name(site_dir, tmp_path):
    os.remove(os.path.join(site_dir.root, "labelsTr", "val_0001.nii.gz"))
    local = tmp_path / "local"
    local.mkdir()
    (local / SITE_CONFIG_FILE).write_text(json.dumps({"datalist": site_dir.datalist}))
    cfg = resolve_site_config("hospital-a", str(local), SMALL.modalities)
    with pytest.raises(DataError, match=r"site 'hospital-a' .*val_0001.nii.gz"):
        load_site_data(cfg, SPEC, SMALL)


def test_dicom_with_ct_window(tmp_path):
    """A CT slice in DICOM (HU) with a NIfTI label, scaled by a CT window."""
    import pydicom  # a requirement: a broken install must fail here, not skip
    from pydicom import examples

    ds = examples.ct
    ds.save_as(str(tmp_path / "slice.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    nib.save(nib.Nifti1Image((hu > 0).astype(np.uint8).T, np.eye(4)), str(tmp_path / "slice_seg.nii.gz"))
    dl = tmp_path / "ct.json"
    entry = {"image": "slice.dcm", "label": "slice_seg.nii.gz"}
    dl.write_text(json.dumps({"training": [entry], "validation": [entry]}))
    spec = ImageSpec(num_classes=2, spatial_size=(64, 64), intensity="window", window=(-160.0, 240.0))
    item = load_items(read_datalist(str(dl), "training"), spec)[0]
    assert item["image"].shape == (1, 64, 64)
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert 0 < int(item["label"].sum()) < 64 * 64
    assert pydicom is not None


def test_auto_cache_follows_the_memory_budget(site_dir, monkeypatch):
    from medflare.data.datalist import CACHE_LIMIT_ENV, CheckedDataset

    items = read_datalist(site_dir.datalist, "training")
    assert not isinstance(load_items(items, SPEC, cache="auto"), CheckedDataset)
    monkeypatch.setenv(CACHE_LIMIT_ENV, "0.000001")  # ~1 kB: 6 images of 64x64 do not fit
    assert isinstance(load_items(items, SPEC, cache="auto"), CheckedDataset)


@pytest.mark.parametrize("cache", [True, "auto"])
def test_cached_items_are_loaded_once_each_and_equal_the_lazy_ones(site_dir, monkeypatch, cache):
    from medflare.data import datalist as dl

    items = read_datalist(site_dir.datalist, "training")
    loads = []
    real = dl._load_one
    monkeypatch.setattr(dl, "_load_one", lambda transform, item: loads.append(item["image"]) or real(transform, item))
    ds = load_items(items, SPEC, cache=cache)
    assert isinstance(ds, dl.CheckedCacheDataset)
    assert sorted(loads) == sorted(i["image"] for i in items)  # every item read exactly once, item 0 included
    lazy = load_items(items, SPEC, cache=False)
    for i in range(len(items)):
        cached, read = ds[i], lazy[i]
        assert torch.equal(cached["image"], read["image"]) and torch.equal(cached["label"], read["label"])
    assert len(loads) == len(items) + len(items)  # the cached dataset reads nothing more; the lazy one reads each
