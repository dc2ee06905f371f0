"""Bad data and malformed site configs, in both data paths: each is a DataError naming the site, file or key
(never a silent default, a truncated label, an averaged volume or a traceback), and valid inputs still load."""

import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medflare.classification.data import load_cls_site_data
from medflare.classification.loaders import load_source, read_image, source_lists
from medflare.classification.synthetic import SyntheticClsConfig
from medflare.data import DataError, ImageSpec, resolve_site_config
from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.segmentation.data import load_site_data
from medflare.data.checks import check_splits, integer_label
from medflare.data.datalist import read_datalist
from medflare.data.site_config import SITE_CONFIG_FILE
from medflare.segmentation.synthetic import write_benchmark
from medflare.common.results import write_csv
from test_datalist import _rewrite as _edit

SIZE = (16, 16)
SMALL = SyntheticSegConfig(n_train=4, n_val=2)
MODALITIES = SMALL.modalities


def _png(path, seed):
    Image.fromarray((np.random.RandomState(seed).rand(20, 20) * 255).astype(np.uint8)).save(path)


@pytest.fixture
def pngs(tmp_path):
    for i in range(6):
        _png(tmp_path / f"{i}.png", i)
    return tmp_path


def _site_config(tmp_path, entry, site="hospital-a"):
    """A site config in ``tmp_path`` (relative paths in it resolve there); returns the folder."""
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps({"sites": {site: entry}}))
    return str(tmp_path)


def _cls(local, site="hospital-a"):
    return load_cls_site_data(site, local, SyntheticClsConfig(), num_classes=2, spatial_size=SIZE)


# ---------------------------------------------------------------- classification images and labels
def test_nan_voxels_are_refused(tmp_path):
    arr = np.random.RandomState(0).rand(20, 20).astype(np.float32)
    arr[3, 4] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(DataError, match=r"nan.nii.gz: image contains NaN or infinite values"):
        read_image(str(tmp_path / "nan.nii.gz"), 1, SIZE)
    arr[3, 4] = np.inf
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(tmp_path / "inf.nii.gz"))
    with pytest.raises(DataError, match="inf.nii.gz: image contains NaN"):
        read_image(str(tmp_path / "inf.nii.gz"), 1, SIZE)


@pytest.mark.parametrize("shape", [(20, 20, 5), (20, 20, 3), (20, 20, 4, 2)])
def test_3d_and_4d_volumes_are_not_averaged_into_one_image(tmp_path, shape):
    nib.save(nib.Nifti1Image(np.random.RandomState(0).rand(*shape).astype(np.float32), np.eye(4)),
             str(tmp_path / "vol.nii.gz"))
    with pytest.raises(DataError, match=r"vol.nii.gz: expected a 2D image"):
        read_image(str(tmp_path / "vol.nii.gz"), 1, SIZE)


def test_single_slice_volume_and_colour_png_still_load(tmp_path):
    nib.save(nib.Nifti1Image(np.random.RandomState(0).rand(20, 20, 1).astype(np.float32), np.eye(4)),
             str(tmp_path / "one.nii.gz"))
    assert read_image(str(tmp_path / "one.nii.gz"), 1, SIZE).shape == (1, 16, 16)
    Image.fromarray((np.random.RandomState(1).rand(20, 20, 3) * 255).astype(np.uint8)).save(tmp_path / "rgb.png")
    assert read_image(str(tmp_path / "rgb.png"), 1, SIZE).shape == (1, 16, 16)


@pytest.mark.parametrize("value, ok", [(2, 2), ("2", 2), ("2.0", 2), (2.0, 2), ("2.9", None), (2.9, None),
                                       ("nan", None), (True, None), ("", None), ("two", None), (None, None)])
def test_integer_labels_are_never_truncated(value, ok):
    if ok is None:
        with pytest.raises(DataError, match="list.csv entry 1: label .* is not an integer"):
            integer_label(value, 4, "list.csv entry 1")
    else:
        assert integer_label(value, 4, "list.csv entry 1") == ok


def test_label_2_9_in_a_list_names_file_and_entry(pngs):
    (pngs / "list.csv").write_text("image,label\n0.png,0\n1.png,2.9\n")
    with pytest.raises(DataError, match=r"list.csv entry 1: label '2.9' is not an integer"):
        load_source({"format": "image_list", "list": "list.csv"}, str(pngs), 4, 1, SIZE)


# ---------------------------------------------------------------- config keys and types
@pytest.mark.parametrize("entry, message", [
    ({"format": "image_list", "list": "list.csv", "val_fracton": 0.5}, r"unknown keys \['val_fracton'\]"),
    ({"format": "image_list", "list": "list.csv", "val_fraction": "0.5"}, r"'val_fraction' must be a number in"),
    ({"format": "image_list", "list": "list.csv", "val_fraction": 1.5}, r"'val_fraction' must be a number in"),
    ({"format": "image_list", "list": "list.csv", "split_seed": "7"}, r"'split_seed' must be an integer"),
    ({"format": "image_list", "list": "list.csv", "classes": "a,b"}, r"'classes' must be a list of strings"),
    ({"format": "image_list", "list": 5}, r"'list' must be a string, got 5"),
    ({"format": "image_list"}, r"format 'image_list' needs 'train' or 'list'"),
    ({"format": "isic", "image_dir": "."}, r"format 'isic' needs 'csv'"),
    ({"format": "rsna", "csv": "x.csv", "window": [40]}, r"'window' must be a list of two numbers"),
    ({"format": "rsna", "csv": "x.csv", "window": [40, 0]}, r"width > 0"),
    ({"format": "tiff"}, r"unknown data format 'tiff'"),
    ({"format": 3}, r"'format' must be a string"),
    ({"list": "list.csv"}, r"'format' is required"),
    ({"format": "image_list", "list": "list.csv", "quality": 3}, r"'quality' must be a string"),
    ({"format": "image_list", "list": "list.csv", "test": "test.csv"}, r"'test' must be a JSON object"),
    ({"format": "image_list", "list": "list.csv", "global_test": {"clean": "x"}},
     r"global_test source 'clean': must be a JSON object"),
    ({"format": "image_list", "list": "list.csv", "allow_outside_data_root": "yes"},
     r"'allow_outside_data_root' must be true or false"),
    ({"synthetic": {"quality": "blur"}, "val_fraction": 0.1}, r"unknown keys \['val_fraction'\] for site"),
    ({"synthetic": "blur"}, r"'synthetic' must be a JSON object"),
    ({"synthetic": {"qualty": "blur"}}, r"unknown keys \['qualty'\]"),
])
def test_malformed_classification_configs_name_site_and_key(pngs, entry, message):
    (pngs / "list.csv").write_text("image,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    with pytest.raises(DataError, match=r"hospital-a") as err:
        _cls(_site_config(pngs, entry))
    assert err.match(message)


@pytest.mark.parametrize("raw, message", [
    ({"sites": ["hospital-a"]}, r"'sites' must be a JSON object"),
    ({"sites": {"hospital-a": "data.json"}}, r"settings of site 'hospital-a' must be a JSON object"),
    ([1, 2], r"expected a JSON object"),
])
def test_malformed_config_files_in_both_paths(tmp_path, raw, message):
    local = tmp_path / "local"
    local.mkdir()
    (local / SITE_CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match=message):
        resolve_site_config("hospital-a", str(local), MODALITIES)
    with pytest.raises(DataError, match=message):
        _cls(str(local))


@pytest.mark.parametrize("entry, message", [
    ({"datalist": "d.json", "cache": "no"}, r"'cache' must be true, false or \"auto\", got 'no'"),
    ({"datalist": "d.json", "cache": 1}, r"'cache' must be true, false"),
    ({"datalist": 5}, r"'datalist' must be a string, got 5"),
    ({"datalist": "d.json", "base_dir": ["a"]}, r"'base_dir' must be a string"),
    ({"datalist": "d.json", "train_key": 1}, r"'train_key' must be a string"),
    ({"datalist": "d.json", "modality": {"t": 1}}, r"'modality' must be a string"),
    ({"datalist": "d.json", "val_fracton": 0.1}, r"unknown keys \['val_fracton'\] for site 'hospital-a'"),
    ({"synthetic": ["t1"]}, r"site 'hospital-a': 'synthetic' must be a JSON object"),
    ({"synthetic": {"modality": "t1", "n": 3}}, r"unknown keys \['n'\]"),
])
def test_malformed_segmentation_configs_name_site_and_key(tmp_path, entry, message):
    with pytest.raises(DataError, match=message) as err:
        resolve_site_config("hospital-a", _site_config(tmp_path, entry), MODALITIES)
    assert err.match("hospital-a")


def test_cache_values_that_are_valid_still_work(tmp_path):
    for cache in (True, False, "auto"):
        cfg = resolve_site_config("hospital-a", _site_config(tmp_path, {"datalist": "d.json", "cache": cache}),
                                  MODALITIES)
        assert cfg.cache == cache


# ---------------------------------------------------------------- leakage and duplicates
def test_check_splits_refuses_leakage_and_reports_duplicates(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    assert check_splits({"train": [a, b], "val": [c]}, "w") == []
    with pytest.raises(DataError, match=r"w: .*/b is listed in both 'train' and 'val'"):
        check_splits({"train": [a, b], "val": [b]}, "w")
    with pytest.raises(DataError, match=r"listed in both 'train' and 'test'"):
        check_splits({"train": [a], "val": [b], "test": [os.path.join(str(tmp_path), ".", "a")]}, "w")
    warnings = check_splits({"train": [a, a, b], "val": [c]}, "w")
    assert len(warnings) == 1 and "'train' split lists 1 case(s) more than once" in warnings[0]


def test_classification_leakage_train_val_and_test(pngs):
    (pngs / "train.csv").write_text("image,label\n0.png,0\n1.png,1\n2.png,0\n")
    (pngs / "val.csv").write_text("image,label\n2.png,0\n3.png,1\n")
    with pytest.raises(DataError, match=r"hospital-a.*2.png is listed in both 'train' and 'val'"):
        _cls(_site_config(pngs, {"format": "image_list", "train": "train.csv", "val": "val.csv"}))
    (pngs / "val.csv").write_text("image,label\n3.png,1\n4.png,0\n")
    (pngs / "test.csv").write_text("image,label\n4.png,0\n5.png,1\n")
    entry = {"format": "image_list", "train": "train.csv", "val": "val.csv",
             "test": {"format": "image_list", "list": "test.csv"}}
    with pytest.raises(DataError, match=r"hospital-a.*4.png is listed in both 'val' and 'test'"):
        _cls(_site_config(pngs, entry))


def test_classification_duplicates_are_warned_and_still_load(pngs):
    (pngs / "train.csv").write_text("image,label\n0.png,0\n0.png,0\n1.png,1\n")
    (pngs / "val.csv").write_text("image,label\n3.png,1\n")
    data = _cls(_site_config(pngs, {"format": "image_list", "train": "train.csv", "val": "val.csv"}))
    assert len(data.train) == 3
    assert len(data.warnings) == 1 and data.warnings[0].startswith("site 'hospital-a'")
    assert "more than once" in data.warnings[0]


def _seg_site(tmp_path):
    return write_benchmark(SMALL, str(tmp_path / "bench"), sites=[0])[0]


def test_segmentation_leakage_and_duplicates(tmp_path):
    site = _seg_site(tmp_path)
    local = _site_config(tmp_path, {"datalist": site.datalist})
    cfg = resolve_site_config("hospital-a", local, MODALITIES)
    _edit(site.datalist, lambda d: d["training"].append(d["training"][0]))
    data = load_site_data(cfg, ImageSpec(), SMALL)
    assert any("'training' split lists 1 case(s) more than once" in w for w in data.warnings)
    _edit(site.datalist, lambda d: d["validation"].append(d["training"][1]))
    with pytest.raises(DataError, match=r"site 'hospital-a' .*listed in both 'training' and 'validation'"):
        load_site_data(cfg, ImageSpec(), SMALL)


# ---------------------------------------------------------------- data root
def test_segmentation_paths_outside_the_data_root(tmp_path):
    site = _seg_site(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    first = os.path.join(site.root, "imagesTr", sorted(os.listdir(os.path.join(site.root, "imagesTr")))[0])
    shutil.copy(first, outside / "img.nii.gz")
    _edit(site.datalist, lambda d: d["training"][0].update(image="../../elsewhere/img.nii.gz"))
    with pytest.raises(DataError, match=r"image file listed in .* lies outside the site's data root"):
        read_datalist(site.datalist, "training")
    _edit(site.datalist, lambda d: d["training"][0].update(image="../../../../../../../etc/passwd"))
    with pytest.raises(DataError, match=r"/etc/passwd lies outside the site's data root"):
        read_datalist(site.datalist, "training")
    _edit(site.datalist, lambda d: d["training"][0].update(image=str(outside / "img.nii.gz")))
    cfg = resolve_site_config("hospital-a", _site_config(tmp_path, {"datalist": site.datalist}), MODALITIES)
    with pytest.raises(DataError, match=r"site 'hospital-a' .*lies outside the site's data root"):
        load_site_data(cfg, ImageSpec(), SMALL)
    # the site's explicit choice: a wider data root, or paths anywhere
    for extra in ({"data_root": str(tmp_path)}, {"allow_outside_data_root": True}):
        cfg = resolve_site_config("hospital-a", _site_config(tmp_path, {"datalist": site.datalist, **extra}),
                                  MODALITIES)
        assert len(load_site_data(cfg, ImageSpec(), SMALL).train) == SMALL.n_train


def test_classification_paths_outside_the_data_root(pngs):
    (pngs / "data").mkdir()
    for i in range(4):
        _png(pngs / "data" / f"{i}.png", i)
    (pngs / "data" / "list.csv").write_text("image,label\n0.png,0\n1.png,1\n2.png,0\n../5.png,1\n")
    entry = {"format": "image_list", "list": "data/list.csv", "val_fraction": 0.5}
    with pytest.raises(DataError, match=r"hospital-a.*list.csv entry 3: .*5.png lies outside the site's data root"):
        _cls(_site_config(pngs, entry))
    assert len(_cls(_site_config(pngs, {**entry, "data_root": "."})).train) == 2
    assert len(_cls(_site_config(pngs, {**entry, "allow_outside_data_root": True})).train) == 2
    (pngs / "data" / "isic.csv").write_text("image,A,B\n../../../etc/passwd,1,0\n")
    with pytest.raises(DataError, match=r"row 2: .*/etc/passwd.jpg lies outside"):
        source_lists({"format": "isic", "csv": "data/isic.csv", "image_dir": "data"}, str(pngs), 2)


def test_non_numeric_one_hot_and_rsna_label_are_data_errors(pngs):
    (pngs / "isic.csv").write_text("image,A,B\n0,1,x\n")
    with pytest.raises(DataError, match=r"isic.csv row 2 \(0\), column B: 'x' is not a number"):
        source_lists({"format": "isic", "csv": "isic.csv"}, str(pngs), 2)
    (pngs / "rsna.csv").write_text("ID,Label\nID_1_epidural,yes\n")
    with pytest.raises(DataError, match=r"rsna.csv row 2: 'yes' is not a number"):
        source_lists({"format": "rsna", "csv": "rsna.csv", "classes": ["epidural", "subdural"]}, str(pngs), 2)


# ---------------------------------------------------------------- DICOM series
def _dicom(path, series_uid, instance):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = series_uid, "1.2.3", instance
    ds.Modality, ds.Rows, ds.Columns = "CT", 8, 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, instance], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.PixelData = np.zeros((8, 8), np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_folder_with_two_series_is_an_error_naming_the_folder(tmp_path):
    folder = tmp_path / "case1"
    folder.mkdir()
    for i in range(2):
        _dicom(folder / f"a{i}.dcm", "1.2.3.4.1", i)
    _dicom(folder / "b0.dcm", "1.2.3.4.2", 5)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 3), np.uint8), np.eye(4)), str(tmp_path / "case1_seg.nii.gz"))
    entry = {"image": "case1", "label": "case1_seg.nii.gz"}
    (tmp_path / "dl.json").write_text(json.dumps({"training": [entry], "validation": [entry]}))
    with pytest.raises(DataError, match=r"DICOM folder .*case1 holds 2 series"):
        read_datalist(str(tmp_path / "dl.json"), "training")
    os.remove(folder / "b0.dcm")
    assert read_datalist(str(tmp_path / "dl.json"), "training")[0]["image"].endswith("case1")


# ---------------------------------------------------------------- CSV outputs
def test_csv_outputs_are_escaped(tmp_path):
    path = str(tmp_path / "out.csv")
    write_csv(path, [{"site": 'a,"b"\nc', "dice": 0.5}, {"site": "=HYPERLINK(\"x\")", "dice": -0.25}])
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["site"] == 'a,"b"\nc' and rows[0]["dice"] == "0.5"
    assert rows[1]["site"] == "'=HYPERLINK(\"x\")" and rows[1]["dice"] == "-0.25"


def test_segmentation_nan_voxels_and_wrong_dimensionality_name_the_file(tmp_path):
    site = _seg_site(tmp_path)
    with open(site.datalist) as f:
        image = os.path.join(site.root, json.load(f)["training"][0]["image"])
    img = nib.load(image)
    arr = np.asarray(img.get_fdata(), dtype=np.float32)
    arr[(0,) * arr.ndim] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), image)
    cfg = resolve_site_config("hospital-a", _site_config(tmp_path, {"datalist": site.datalist, "cache": True}),
                              MODALITIES)
    with pytest.raises(DataError, match=r"site 'hospital-a' .*imagesTr/train_0000.nii.gz: image contains NaN"):
        load_site_data(cfg, ImageSpec(), SMALL)
    nib.save(nib.Nifti1Image(np.zeros(arr.shape + (4, 2), np.float32), img.affine), image)
    with pytest.raises(DataError, match=r"spatial dimensions, expected 2"):
        load_site_data(cfg, ImageSpec(), SMALL)
