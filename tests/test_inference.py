"""Segmentation inference with a trained checkpoint: geometry kept for NIfTI 2D/3D, DICOM series and datalists,
Dice equal to cross-site evaluation's, sliding windows, and clear errors for bad input."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import LoadImage

from medflare.data.datalist import DataError, load_items, read_datalist
from medflare.artefacts.inference.inputs import Case, segmentation_cases
from medflare.artefacts.inference.segmentation import Segmenter, dice_rows, image_spec, segment_cases
from medflare.segmentation.metrics import evaluate_segmentation
from medflare.artefacts.provenance import ProvenanceError
from medflare.artefacts.trained_model import load_checkpoint

from trained_models import briefly_trained_model, nifti, segmentation_persistor, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "FL_global_model.pt")
    return load_checkpoint(write_checkpoint(path, segmentation_persistor({"spatial_size": (32, 32)})))


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt3d") / "FL_global_model.pt")
    persistor = segmentation_persistor({"spatial_dims": 3, "spatial_size": (16, 16, 16)})
    return load_checkpoint(write_checkpoint(path, persistor))


def _assert_same_grid(output: str, image: str) -> np.ndarray:
    """The label map has the image's shape and affine (as MONAI reads the image); returns its values."""
    ref = LoadImage(image_only=True)(image)
    out = nib.load(output)
    assert out.shape == tuple(ref.shape), f"label map {out.shape} vs image {tuple(ref.shape)}"
    np.testing.assert_allclose(out.affine, ref.affine.numpy(), atol=1e-5)
    values = np.asarray(out.dataobj)
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1, 2}
    return values


def test_nifti_2d_keeps_affine_and_shape(model_2d, tmp_path):
    image = nifti(str(tmp_path / "in" / "case_a.nii.gz"), np.random.RandomState(0).rand(50, 37).astype(np.float32))
    [result] = segment_cases(Segmenter(model_2d, CPU), segmentation_cases(image), str(tmp_path / "out"))
    assert result.output == str(tmp_path / "out" / "case_a_seg.nii.gz") and result.shape == (50, 37)
    _assert_same_grid(result.output, image)
    assert nib.load(result.output).affine[0, 0] == pytest.approx(0.8) and not result.dice


def test_nifti_3d_folder_keeps_affine_and_shape(model_3d, tmp_path):
    rotation = np.array([[0, -1.2, 0, 5], [0.9, 0, 0, -7], [0, 0, 2.5, 1], [0, 0, 0, 1]], dtype=float)
    images = [nifti(str(tmp_path / "in" / f"vol{i}.nii.gz"), np.random.RandomState(i).rand(*shape).astype(np.float32),
                    rotation) for i, shape in enumerate([(20, 18, 13), (16, 16, 16)])]
    cases = segmentation_cases(str(tmp_path / "in"))
    assert [c.image for c in cases] == images
    results = segment_cases(Segmenter(model_3d, CPU), cases, str(tmp_path / "out"))
    for result, image in zip(results, images):
        _assert_same_grid(result.output, image)


def _write_dicom_series(folder: str, n_slices: int = 6, rows: int = 24, cols: int = 20) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    rs = np.random.RandomState(1)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, series, "CT"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-12.0, -10.0, 3.0 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.9, 0.8], 3.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (rs.rand(rows, cols) * 2000).astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"slice{k:03d}.dcm"), enforce_file_format=True)


def test_dicom_series_keeps_geometry(model_3d, tmp_path):
    series = str(tmp_path / "ct_series")
    _write_dicom_series(series)
    [case] = segmentation_cases(series)
    assert case.image == series
    [result] = segment_cases(Segmenter(model_3d, CPU), [case], str(tmp_path / "out"))
    assert result.output.endswith("ct_series_seg.nii.gz")
    _assert_same_grid(result.output, series)
    assert result.shape == (20, 24, 6) or result.shape == (24, 20, 6)


@pytest.fixture(scope="module")
def trained_on_benchmark(tmp_path_factory):
    """A briefly trained 2D model and the synthetic site whose test list it is scored on."""
    return briefly_trained_model(str(tmp_path_factory.mktemp("trained")))


def test_datalist_dice_equals_cross_site_evaluation(trained_on_benchmark, tmp_path):
    model, datalist = trained_on_benchmark
    segmenter = Segmenter(model, CPU)
    cases = segmentation_cases(datalist, key="test")
    results = segment_cases(segmenter, cases, str(tmp_path / "out"))
    for result in results:
        _assert_same_grid(result.output, result.case.image)
    summary = segmenter.summary()
    # what a site's cross-site evaluation computes for this model: its executor's evaluate("test")
    spec = image_spec(model.preprocessing)
    cross_site = evaluate_segmentation(model.network, load_items(read_datalist(datalist, "test"), spec), 3, CPU,
                                       batch_size=16, class_names=model.preprocessing["class_names"])
    assert cross_site["dice"] > 0.2, "the briefly trained model should segment something"
    for key in ("dice", "dice_organ", "dice_lesion"):
        assert summary["dice"][key] == pytest.approx(cross_site[key], abs=1e-6)
    assert 0.0 < summary["native_dice"]["dice"] <= 1.0  # reported beside it (images 48 px, model at 32 px)
    rows = dice_rows(results, summary)
    assert len(rows) == len(cases) + 1 and rows[-1]["case"] == "mean" and "native_dice_lesion" in rows[0]


def test_sliding_window_for_images_larger_than_the_window(tmp_path):
    persistor = segmentation_persistor({"spatial_size": None, "eval_roi_size": (32, 32)})
    model = load_checkpoint(write_checkpoint(str(tmp_path / "ckpt.pt"), persistor))
    segmenter = Segmenter(model, CPU)
    assert type(segmenter.inferer).__name__ == "SlidingWindowInferer"
    image = nifti(str(tmp_path / "big.nii.gz"), np.random.RandomState(2).rand(72, 56).astype(np.float32))
    [result] = segment_cases(segmenter, [Case(image)], str(tmp_path / "out"))
    _assert_same_grid(result.output, image)


def test_bad_inputs_raise_errors_naming_the_file(model_2d, tmp_path):
    segmenter = Segmenter(model_2d, CPU)
    volume = nifti(str(tmp_path / "volume.nii.gz"), np.zeros((20, 20, 20), np.float32))
    with pytest.raises(DataError, match=r"volume\.nii\.gz: image has 3 spatial dimensions, expected 2"):
        segmenter.segment(Case(volume), str(tmp_path / "out"))
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image")
    with pytest.raises(DataError, match="corrupt.nii.gz"):
        segmenter.segment(Case(str(corrupt)), str(tmp_path / "out"))
    nan = nifti(str(tmp_path / "nan.nii.gz"), np.full((30, 30), np.nan, np.float32))
    with pytest.raises(DataError, match=r"nan\.nii\.gz: image contains NaN"):
        segmenter.segment(Case(nan), str(tmp_path / "out"))
    with pytest.raises(DataError, match="input not found: .*missing.nii.gz"):
        segmentation_cases(str(tmp_path / "missing.nii.gz"))
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"test": [{"image": "absent.nii.gz"}]}))
    with pytest.raises(DataError, match=r"image listed in .*list\.json not found: .*absent\.nii\.gz"):
        segmentation_cases(str(datalist))
    with pytest.raises(DataError, match="no .*'validation' list"):
        segmentation_cases(str(datalist), key="validation")


def test_two_channel_image_is_refused_naming_the_file(model_3d, tmp_path):
    image = nifti(str(tmp_path / "two_channels.nii.gz"), np.zeros((16, 16, 16, 2), np.float32))
    with pytest.raises(DataError, match=r"two_channels\.nii\.gz: image has 2 channels, the model expects 1"):
        Segmenter(model_3d, CPU).segment(Case(image), str(tmp_path / "out"))


def test_checkpoint_without_provenance_gets_a_clear_message(model_2d, tmp_path):
    old = str(tmp_path / "old_FL_global_model.pt")
    torch.save({"model": model_2d.network.state_dict(), "train_conf": {"train": {"model": "FeatureUNet"}}}, old)
    with pytest.raises(ProvenanceError, match=r"old_FL_global_model\.pt has no medflare provenance record"):
        load_checkpoint(old)


def test_segment_command(trained_on_benchmark, tmp_path):
    """The command as a user runs it: a datalist with labels gives label maps and a Dice table; a bad image
    ends it with exit code 2 and a message naming the file."""
    model, datalist = trained_on_benchmark
    out = str(tmp_path / "seg")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "segment.py"), model.source, datalist,
                          "--out", out, "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "s per case on cpu" in run.stdout and "mean Dice over 6 labelled cases" in run.stdout
    assert "6/6" in run.stderr
    assert len([f for f in os.listdir(out) if f.endswith("_seg.nii.gz")]) == 6
    with open(os.path.join(out, "dice.csv")) as f:
        assert f.readline().startswith("case,dice_organ,dice_lesion,dice,native_dice_organ")
    bad = nifti(str(tmp_path / "bad" / "vol.nii.gz"), np.zeros((8, 8, 8), np.float32))
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "segment.py"), model.source, bad,
                          "--out", out], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "vol.nii.gz: image has 3 spatial dimensions" in run.stderr
