"""Real-data classification loaders on tiny generated fixtures: image lists (PNG/JPEG/NIfTI), ISIC-2019-style
CSV over JPEGs, RSNA-ICH-style DICOM slices with a label CSV and a CT window."""

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medflare.classification.data import load_cls_site_data
from medflare.classification.loaders import load_source, read_image
from medflare.classification.synthetic import SyntheticClsConfig
from medflare.data import DataError

SIZE = (32, 32)


def _png(path, value, rgb=False):
    rs = np.random.RandomState(value)
    arr = (rs.rand(20, 24, 3) * 255).astype(np.uint8) if rgb else (rs.rand(20, 24) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def test_image_list_csv_and_json_with_png_jpeg_nifti(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "b.jpg", 2, rgb=True)
    nib.save(nib.Nifti1Image(np.random.RandomState(3).rand(20, 24, 1).astype(np.float32), np.eye(4)),
             str(tmp_path / "c.nii.gz"))
    _png(tmp_path / "d.png", 4)
    (tmp_path / "train.csv").write_text("image,label\na.png,0\nb.jpg,1\nc.nii.gz,2\n")
    (tmp_path / "val.json").write_text(json.dumps([{"image": "d.png", "label": 3}]))  # a case in one split only
    train, val = load_source({"format": "image_list", "train": "train.csv", "val": "val.json"}, str(tmp_path), 4, 1,
                             SIZE)
    assert train.images.shape == (3, 1, 32, 32) and train.labels.tolist() == [0, 1, 2]
    assert val.labels.tolist() == [3]
    assert abs(float(train.images[1].mean())) < 1e-4 and abs(float(train.images[1].std()) - 1) < 0.05
    rgb = read_image(str(tmp_path / "b.jpg"), 3, SIZE)
    assert rgb.shape == (3, 32, 32)


def test_image_list_errors_name_the_file(tmp_path):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "train.csv").write_text("image,label\na.png,0\nmissing.png,1\n")
    with pytest.raises(DataError, match="missing.png"):
        load_source({"format": "image_list", "list": "train.csv", "val_fraction": 0.5}, str(tmp_path), 2, 1, SIZE)
    (tmp_path / "bad.csv").write_text("image,label\na.png,7\n")
    with pytest.raises(DataError, match="bad.csv.*label 7"):
        load_source({"format": "image_list", "list": "bad.csv"}, str(tmp_path), 2, 1, SIZE)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.csv").write_text("image,label\nbroken.png,0\n")
    with pytest.raises(DataError, match="broken.png"):
        load_source({"format": "image_list", "list": "broken.csv", "val_fraction": 0.0}, str(tmp_path), 2, 1, SIZE)


def test_isic_one_hot_csv_over_jpegs(tmp_path):
    (tmp_path / "images").mkdir()
    classes = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
    lines = ["image," + ",".join(classes) + ",UNK"]
    for i in range(10):
        _png(tmp_path / "images" / f"ISIC_{i:07d}.jpg", i, rgb=True)
        hot = ["0.0"] * 8
        hot[i % 8] = "1.0"
        lines.append(f"ISIC_{i:07d}," + ",".join(hot) + ",0.0")
    (tmp_path / "gt.csv").write_text("\n".join(lines) + "\n")
    entry = {"format": "isic", "csv": "gt.csv", "image_dir": "images", "val_fraction": 0.2}
    train, val = load_source(entry, str(tmp_path), 8, 3, SIZE)
    assert len(train) == 8 and len(val) == 2 and train.images.shape[1:] == (3, 32, 32)
    assert sorted(train.labels.tolist() + val.labels.tolist()) == sorted(i % 8 for i in range(10))
    (tmp_path / "bad.csv").write_text(lines[0] + "\nISIC_0000001," + ",".join(["1.0"] * 8) + ",0.0\n")
    with pytest.raises(DataError, match="not one-hot"):
        load_source({**entry, "csv": "bad.csv"}, str(tmp_path), 8, 3, SIZE)


def _dicom(path, hu):
    from pydicom import examples

    ds = examples.ct
    raw = np.round((hu - float(ds.RescaleIntercept)) / float(ds.RescaleSlope)).astype(ds.pixel_array.dtype)
    ds.Rows, ds.Columns = raw.shape
    ds.PixelData = raw.tobytes()
    ds.save_as(str(path))


def test_rsna_dicom_folder_with_ct_window(tmp_path):
    (tmp_path / "dicom").mkdir()
    rows = ["ID,Label"]
    subtypes = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]
    for i in range(6):
        hu = np.full((24, 24), -1000.0)
        hu[4:20, 4:20] = 40.0 + 10 * i  # brain-window tissue
        _dicom(tmp_path / "dicom" / f"ID_{i:04d}.dcm", hu)
        for j, st in enumerate(subtypes):
            positive = (j == i % 5) or st == "any"
            if i == 5 and st == "subdural":
                positive = True  # slice 5 has two subtypes: skipped
            rows.append(f"ID_{i:04d}_{st},{int(positive)}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    entry = {"format": "rsna", "csv": "labels.csv", "dicom_dir": "dicom", "window": [40, 80], "val_fraction": 0.4}
    train, val = load_source(entry, str(tmp_path), 5, 1, SIZE)
    assert len(train) + len(val) == 5
    assert sorted(train.labels.tolist() + val.labels.tolist()) == [0, 1, 2, 3, 4]
    # the window maps air (-1000 HU) to 0 before the z-score: background is the minimum, tissue brighter
    img = read_image(str(tmp_path / "dicom" / "ID_0001.dcm"), 1, (24, 24), window=(40, 80))
    assert img[0, 0, 0] < img[0, 12, 12]
    (tmp_path / "wide.csv").write_text("image,label\nID_0000,epidural\nID_0001,subdural\n")
    train, _ = load_source({**entry, "csv": "wide.csv", "val_fraction": 0.0}, str(tmp_path), 5, 1, SIZE)
    assert sorted(train.labels.tolist()) == [0, 4]


def test_site_config_selects_real_data_and_a_global_test(tmp_path, monkeypatch):
    for i in range(4):
        _png(tmp_path / f"{i}.png", i)
    (tmp_path / "list.csv").write_text("image,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4)))
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"sites": {"hospital-a": {
        "format": "image_list", "list": "list.csv", "val_fraction": 0.5, "quality": "scanner-x",
        "global_test": {"clean": {"format": "image_list", "list": "list.csv"}}}}}))
    monkeypatch.setenv("MEDFLARE_SITE_CONFIG", str(config))
    data = load_cls_site_data("hospital-a", None, SyntheticClsConfig(), num_classes=2, spatial_size=SIZE)
    assert len(data.train) == 2 and len(data.val) == 2 and data.quality == "scanner-x"
    assert len(data.global_test["clean"]) == 4
    config.write_text(json.dumps({"format": "image_list", "list": "list.csv", "val_fraction": 0.0}))
    with pytest.raises(DataError, match="hospital-a.*validation split"):
        load_cls_site_data("hospital-a", None, SyntheticClsConfig(), num_classes=2, spatial_size=SIZE)


def test_nested_test_sources_take_the_sites_data_root_and_format(tmp_path, monkeypatch):
    """A site's ``data_root`` (and format) apply to its nested ``test`` and ``global_test`` sources unless they set
    their own; a nested source's own ``data_root`` still confines it."""
    images = tmp_path / "images"
    (images / "test").mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    for i in range(4):
        _png(images / f"{i}.png", i)
        _png(images / "test" / f"t{i}.png", 10 + i)
    (lists / "train.csv").write_text("image,label\n" + "".join(f"../images/{i}.png,{i % 2}\n" for i in range(4)))
    (lists / "test.csv").write_text("image,label\n" + "".join(f"../images/test/t{i}.png,{i % 2}\n" for i in range(3)))
    site = {"format": "image_list", "list": "lists/train.csv", "val_fraction": 0.5, "data_root": "images",
            "test": {"list": "lists/test.csv"}, "global_test": {"clean": {"list": "lists/test.csv"}}}
    config = tmp_path / "sites.json"
    config.write_text(json.dumps({"sites": {"hospital-a": site}}))
    monkeypatch.setenv("MEDFLARE_SITE_CONFIG", str(config))
    data = load_cls_site_data("hospital-a", None, SyntheticClsConfig(), num_classes=2, spatial_size=SIZE)
    assert len(data.test) == 3 and len(data.global_test["clean"]) == 3
    # the test images lie under the site's data root but outside the list's folder: without the inherited root
    # they would be refused
    site["test"] = {"list": "lists/test.csv", "data_root": "images/test"}
    site["global_test"] = {"clean": {"list": "lists/test.csv", "data_root": "lists"}}
    config.write_text(json.dumps({"sites": {"hospital-a": site}}))
    with pytest.raises(DataError, match=r"test.csv entry 0: .*outside the site's data root .*lists"):
        load_cls_site_data("hospital-a", None, SyntheticClsConfig(), num_classes=2, spatial_size=SIZE)


def _reference_read(path, in_channels, size, window=None):
    """The image read by hand (Pillow, nibabel, pydicom, numpy and torch), independently of MONAI's transforms."""
    import torch

    if path.endswith(".nii.gz"):
        arr, colour = np.squeeze(np.asarray(nib.load(path).get_fdata(), dtype=np.float32)), False
    elif path.endswith(".dcm"):
        import pydicom

        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        colour = False
    else:
        with Image.open(path) as im:
            colour = im.mode not in ("L", "I", "I;16", "F")
            arr = np.asarray(im.convert("RGB") if colour else im, dtype=np.float32)
    if window is not None:
        low = window[0] - window[1] / 2
        arr = (np.clip(arr, low, low + window[1]) - low) / window[1]
    arr = arr[..., None] if arr.ndim == 2 else arr
    if arr.shape[-1] != in_channels:
        arr = arr.mean(axis=-1, keepdims=True) if in_channels == 1 else np.repeat(arr, in_channels, axis=-1)
    t = torch.as_tensor(np.moveaxis(arr, -1, 0).copy())[None]
    t = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].double()
    mean = t.mean(dim=(1, 2), keepdim=True)
    std = t.std(dim=(1, 2), keepdim=True, unbiased=False)
    return ((t - mean) / std).float().numpy()


@pytest.mark.parametrize("kind,in_channels", [("png", 1), ("png", 3), ("rgb_jpg", 3), ("rgb_jpg", 1),
                                              ("palette_png", 3), ("nifti", 1), ("dicom", 1)])
def test_read_image_matches_a_read_by_hand(tmp_path, kind, in_channels):
    """MONAI's transforms read every format as a hand-written read does: the same orientation of a non-square
    image (rows first: a 20x24 image is not transposed), channels, resize and z-score."""
    if kind == "png":
        path, window = str(tmp_path / "a.png"), None
        _png(path, 1)
    elif kind == "rgb_jpg":
        path, window = str(tmp_path / "b.jpg"), None
        _png(path, 2, rgb=True)
    elif kind == "palette_png":
        path, window = str(tmp_path / "p.png"), None
        Image.fromarray((np.random.RandomState(5).rand(20, 24) * 255).astype(np.uint8)).convert("P").save(path)
    elif kind == "nifti":
        path, window = str(tmp_path / "c.nii.gz"), None
        nib.save(nib.Nifti1Image(np.random.RandomState(3).rand(20, 24, 1).astype(np.float32), np.eye(4)), path)
    else:
        path, window = str(tmp_path / "d.dcm"), (40.0, 80.0)
        hu = np.full((20, 24), -1000.0)
        hu[4:16, 6:20] = np.linspace(0.0, 90.0, 12 * 14).reshape(12, 14)
        _dicom(path, hu)
    got = read_image(path, in_channels, (32, 40), window)
    expected = _reference_read(path, in_channels, (32, 40), window)
    assert got.shape == (in_channels, 32, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_read_image_refuses_volumes_and_non_finite_values_naming_the_file(tmp_path):
    volume = str(tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(np.random.RandomState(3).rand(20, 24, 3).astype(np.float32), np.eye(4)), volume)
    with pytest.raises(DataError, match=r"v\.nii\.gz: expected a 2D image, got a volume"):
        read_image(volume, 1, SIZE)
    bad = np.random.RandomState(3).rand(20, 24, 1).astype(np.float32)
    bad[3, 4, 0] = np.nan
    nan = str(tmp_path / "n.nii.gz")
    nib.save(nib.Nifti1Image(bad, np.eye(4)), nan)
    with pytest.raises(DataError, match=r"n\.nii\.gz: image contains NaN"):
        read_image(nan, 1, SIZE)


def test_dicom_without_suffix_reads_as_with_it_and_a_multi_frame_grey_dicom_is_refused(tmp_path):
    """A DICOM read for its CT window without the ``.dcm`` suffix gives the same image (no other reader takes over
    and transposes it); a multi-frame grey DICOM is a volume, refused like a 3D NIfTI."""
    from pydicom import examples

    hu = np.full((20, 24), -1000.0)
    hu[4:16, 6:20] = np.linspace(0.0, 90.0, 12 * 14).reshape(12, 14)
    _dicom(tmp_path / "a.dcm", hu)
    (tmp_path / "a_no_suffix").write_bytes((tmp_path / "a.dcm").read_bytes())
    np.testing.assert_array_equal(read_image(str(tmp_path / "a_no_suffix"), 1, (32, 40), window=(40, 80)),
                                  read_image(str(tmp_path / "a.dcm"), 1, (32, 40), window=(40, 80)))
    ds = examples.ct
    frames = np.zeros((3, 20, 24), dtype=ds.pixel_array.dtype)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 20, 24, 3
    ds.PixelData = frames.tobytes()
    ds.save_as(str(tmp_path / "frames.dcm"))
    with pytest.raises(DataError, match=r"frames\.dcm: expected a 2D image, got a volume"):
        read_image(str(tmp_path / "frames.dcm"), 1, SIZE, window=(40, 80))
