"""MONAI bundle export: checked by MONAI's bundle tools, run by MONAI's runner, and giving the same label maps as
medflare's own inference; site models export the same way; models that cannot be bundles are refused clearly."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from medflare.artefacts.bundle import BundleError, export_bundle, preprocessing_config, verify_bundle
from medflare.data.datalist import ImageSpec, image_transforms
from medflare.artefacts.inference.inputs import segmentation_cases
from medflare.artefacts.inference.segmentation import Segmenter, segment_cases
from medflare.artefacts.trained_model import available_models, load_checkpoint, load_trained_model

from trained_models import briefly_trained_model, nifti, segmentation_persistor, write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_monai_bundle(bundle: str, images: str, out: str) -> subprocess.CompletedProcess:
    """MONAI's own runner on a folder of images, as the bundle's README says."""
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
                           "--dataset_dir", images, "--output_dir", out], cwd=bundle, capture_output=True,
                          text=True, timeout=600)


def label_agreement(dir_a: str, dir_b: str) -> float:
    """Fraction of voxels on which the label maps of two folders agree (same files, same affines required)."""
    names = sorted(f for f in os.listdir(dir_a) if f.endswith("_seg.nii.gz"))
    assert names and names == sorted(f for f in os.listdir(dir_b) if f.endswith("_seg.nii.gz"))
    same = total = 0
    for name in names:
        a, b = nib.load(os.path.join(dir_a, name)), nib.load(os.path.join(dir_b, name))
        assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-5), name
        same += int(np.sum(np.asarray(a.dataobj) == np.asarray(b.dataobj)))
        total += int(np.prod(a.shape))
    return same / total


def bundle_agreement(bundle: str, model, cases, tmp_path) -> float:
    """Run the bundle with MONAI's runner and ``model`` with medflare's inference on the images of ``cases``;
    return the fraction of voxels on which their label maps agree."""
    images = str(tmp_path / "images")
    os.makedirs(images)
    for case in cases:
        shutil.copy(case.image, images)
    run = run_monai_bundle(bundle, images, str(tmp_path / "monai_out"))
    assert run.returncode == 0, run.stderr[-3000:]
    segment_cases(Segmenter(model, torch.device("cpu")), segmentation_cases(images), str(tmp_path / "medflare_out"))
    return label_agreement(str(tmp_path / "monai_out"), str(tmp_path / "medflare_out"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return briefly_trained_model(str(tmp_path_factory.mktemp("trained")))


def test_bundle_is_verified_and_runs_like_medflare_inference(trained, tmp_path):
    model, datalist = trained
    bundle = export_bundle(model, str(tmp_path / "bundle"))
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
        assert os.path.isfile(os.path.join(bundle, part)), part
    checks = verify_bundle(bundle)
    assert checks["config"] == checks["net_in_out"] == checks["weights"] == "ok" and "metadata" in checks
    readme = open(os.path.join(bundle, "docs", "README.md")).read()
    assert "job: `test_job`" in readme and "python -m monai.bundle run" in readme

    agreement = bundle_agreement(bundle, model, segmentation_cases(datalist, key="test")[:3], tmp_path)
    print(f"voxel agreement between the MONAI bundle and medflare inference: {agreement:.6f}")
    assert agreement >= 0.999


@pytest.mark.parametrize("intensity,window", [("minmax", None), ("zscore", None), ("window", (0.1, 0.7))])
def test_bundle_preprocessing_equals_the_loaders(intensity, window, tmp_path):
    spec = ImageSpec(spatial_size=(24, 20), intensity=intensity, window=window)
    image = nifti(str(tmp_path / "x.nii.gz"), np.random.RandomState(0).rand(40, 33).astype(np.float32))
    parser = ConfigParser({"preprocessing": preprocessing_config({**spec.__dict__})})
    from_bundle = parser.get_parsed_content("preprocessing")({"image": image})["image"]
    from_loader = image_transforms(spec)({"image": image})["image"]
    assert torch.equal(torch.as_tensor(from_bundle), torch.as_tensor(from_loader))


def test_site_model_of_a_run_exports_the_same_way(trained, tmp_path):
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.app_common.decomposers import common_decomposers

    common_decomposers.register()
    model, _ = trained
    run_dir = tmp_path / "simulate_job"
    (run_dir / "app_server").mkdir(parents=True)
    shutil.copy(model.source, run_dir / "app_server" / "FL_global_model.pt")
    site_weights = {k: v.numpy() * 0.5 for k, v in model.state_dict().items()}
    (run_dir / "cross_site_val" / "model_shareables").mkdir(parents=True)
    DXO(DataKind.WEIGHTS, data=site_weights).to_file(str(run_dir / "cross_site_val" / "model_shareables" / "site-1"))
    assert available_models(str(run_dir)) == ["global", "site-1"]
    site = load_trained_model(str(run_dir), "site-1")
    assert site.name == "site-1" and site.provenance["checkpoint"]["model"] == "site-1"
    assert torch.equal(site.state_dict()["model.0.conv.unit0.conv.weight"],
                       torch.as_tensor(site_weights["model.0.conv.unit0.conv.weight"]))
    bundle = export_bundle(site, str(tmp_path / "bundle_site1"))
    assert verify_bundle(bundle)["weights"] == "ok"
    assert "model `site-1`" in open(os.path.join(bundle, "docs", "README.md")).read()
    with pytest.raises(FileNotFoundError, match="no local model of site 'site-9'"):
        load_trained_model(str(run_dir), "site-9")


def test_domain_head_model_exports_its_unet(tmp_path):
    persistor = segmentation_persistor(model={"name": "unet_domain", "n_domains": 3})
    model = load_checkpoint(write_checkpoint(str(tmp_path / "ckpt.pt"), persistor))
    bundle = export_bundle(model, str(tmp_path / "bundle"))
    state = torch.load(os.path.join(bundle, "models", "model.pt"), weights_only=True)
    assert not any(k.startswith("domain") for k in state) and verify_bundle(bundle)["weights"] == "ok"


def test_classifier_is_refused(tmp_path):
    from medflare.flare.executors import ClassificationExecutor
    from medflare.flare.persistors import ModelPersistor
    from medflare.artefacts.provenance import executor_preprocessing

    persistor = ModelPersistor(model={"name": "tiny_cnn"},
                                           preprocessing=executor_preprocessing(ClassificationExecutor()))
    model = load_checkpoint(write_checkpoint(str(tmp_path / "ckpt.pt"), persistor))
    with pytest.raises(BundleError, match="holds a classification model; bundle export supports segmentation"):
        export_bundle(model, str(tmp_path / "bundle"))


def test_export_command(trained, tmp_path):
    model, _ = trained
    run = subprocess.run([sys.executable, os.path.join(REPO, "tools", "export_bundle.py"), model.source,
                          str(tmp_path / "bundle")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "MONAI checks: config ok, net_in_out ok, weights ok" in run.stdout
