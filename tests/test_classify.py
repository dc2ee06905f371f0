"""Classification inference with a trained fairness-job checkpoint: image lists, ISIC-style CSVs and DICOM folders
give per-image class probabilities from the site loader's own preprocessing; bad input names the file."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from medflare.classification.loaders import read_image
from medflare.data.datalist import DataError
from medflare.artefacts.inference.classification import Classifier, accuracy
from medflare.artefacts.inference.inputs import classification_cases
from medflare.flare.persistors import ModelPersistor
from medflare.artefacts.provenance import executor_preprocessing
from medflare.artefacts.trained_model import load_checkpoint

from trained_models import write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def classifier_model(tmp_path_factory):
    from medflare.flare.executors import ClassificationExecutor

    executor = ClassificationExecutor(spatial_size=(32, 32))
    persistor = ModelPersistor(model={"name": "tiny_cnn", "in_channels": 1, "num_classes": 4},
                                           preprocessing=executor_preprocessing(executor))
    path = str(tmp_path_factory.mktemp("cls") / "FL_global_model.pt")
    return load_checkpoint(write_checkpoint(path, persistor))


def _png(path: str, seed: int, size=(40, 36)) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray((np.random.RandomState(seed).rand(*size) * 255).astype(np.uint8)).save(path)
    return path


def _dicom(path: str, seed: int) -> str:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CTImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 30, 30, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (np.random.RandomState(seed).rand(30, 30) * 1200).astype(np.int16).tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_image_list_gives_probabilities_of_the_loaders_preprocessing(classifier_model, tmp_path):
    images = [_png(str(tmp_path / "img" / f"case{i}.png"), i) for i in range(5)]
    with open(tmp_path / "list.csv", "w") as f:
        f.write("image,label\n" + "".join(f"img/case{i}.png,{i % 4}\n" for i in range(5)))
    cases, classes = classification_cases(str(tmp_path / "list.csv"))
    assert [c.image for c in cases] == images and classes is None
    classifier = Classifier(classifier_model, CPU)
    rows = classifier.rows(cases, batch_size=2)
    expected = torch.softmax(classifier_model.network(torch.as_tensor(
        np.stack([read_image(p, 1, (32, 32)) for p in images]))), dim=1).detach().numpy()
    for row, probs in zip(rows, expected):
        got = [row[f"p_{k}"] for k in range(4)]
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert row["predicted"] == str(int(np.argmax(probs)))
    assert [r["label"] for r in rows] == ["0", "1", "2", "3", "0"]
    assert accuracy(rows)["n"] == 5


def test_accuracy_of_rows_by_hand():
    rows = [{"label": "NV", "predicted": "NV"}, {"label": "NV", "predicted": "MEL"}, {"label": "NV", "predicted": "NV"},
            {"label": "MEL", "predicted": "MEL"}, {"predicted": "AK"}]  # the unlabelled row is not counted
    assert accuracy(rows) == pytest.approx({"n": 4, "accuracy": 3 / 4, "balanced_accuracy": (2 / 3 + 1) / 2})
    assert accuracy([{"predicted": "NV"}]) is None


def test_isic_csv_gives_class_names_and_labels(classifier_model, tmp_path):
    for name in ("ISIC_1", "ISIC_2"):
        Image.fromarray((np.random.RandomState(3).rand(40, 40, 3) * 255).astype(np.uint8)).save(
            tmp_path / f"{name}.jpg")
    with open(tmp_path / "gt.csv", "w") as f:
        f.write("image,MEL,NV,BCC,AK,UNK\nISIC_1,0,1,0,0,0\nISIC_2,0,0,0,1,0\n")
    cases, classes = classification_cases(str(tmp_path / "gt.csv"))
    assert classes == ["MEL", "NV", "BCC", "AK"] and [c.label for c in cases] == ["1", "3"]
    rows = Classifier(classifier_model, CPU, class_names=classes).rows(cases)
    assert [r["label"] for r in rows] == ["NV", "AK"] and {"p_MEL", "p_AK"} <= set(rows[0])
    assert sum(rows[0][f"p_{c}"] for c in classes) == pytest.approx(1.0, abs=1e-5)


def test_dicom_folder_with_window(classifier_model, tmp_path):
    files = [_dicom(str(tmp_path / "dcm" / f"slice{i}.dcm"), i) for i in range(3)]
    cases, _ = classification_cases(str(tmp_path / "dcm"))
    assert [c.image for c in cases] == files
    classifier = Classifier(classifier_model, CPU, window=(40, 80))
    assert len(classifier.rows(cases)) == 3
    np.testing.assert_allclose(classifier.read(cases[0]), read_image(files[0], 1, (32, 32), (40, 80)))


def test_bad_classification_inputs_name_the_file(classifier_model, tmp_path):
    with open(tmp_path / "list.csv", "w") as f:
        f.write("image\nmissing.png\n")
    with pytest.raises(DataError, match=r"image listed in .*list\.csv not found: .*missing\.png"):
        classification_cases(str(tmp_path / "list.csv"))
    (tmp_path / "broken.png").write_bytes(b"no png")
    with pytest.raises(DataError, match="broken.png"):
        Classifier(classifier_model, CPU).rows(classification_cases(str(tmp_path / "broken.png"))[0])
    with pytest.raises(ValueError, match="holds a classification model; use the classification tool"):
        from medflare.artefacts.inference.segmentation import Segmenter

        Segmenter(classifier_model, CPU)


def test_classify_command(classifier_model, tmp_path):
    for i in range(3):
        _png(str(tmp_path / "images" / f"x{i}.png"), i)
    out = str(tmp_path / "pred.csv")
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "classify.py"), classifier_model.source,
                          str(tmp_path / "images"), "--out", out], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote 3 predictions" in run.stdout and "3/3" in run.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [os.path.basename(r["image"]) for r in rows] == ["x0.png", "x1.png", "x2.png"]
    assert set(rows[0]) == {"image", "p_0", "p_1", "p_2", "p_3", "predicted"}
