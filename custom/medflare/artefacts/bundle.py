"""Export a trained segmentation model as a MONAI bundle that MONAI's own runner executes.

A bundle folder holds::

    configs/metadata.json     MONAI metadata: versions, task, network input/output format, the provenance record
    configs/inference.json    read a folder of NIfTI images, the site loader's preprocessing as MONAI transforms,
                              the network, the way back to each image's grid, one NIfTI label map per image
    models/model.pt           the network's state_dict (a plain MONAI UNet: no medflare code is needed)
    docs/README.md            what the model is, how it was trained (provenance, cross-site table), how to run it

and runs with ``python -m monai.bundle run --config_file configs/inference.json --dataset_dir <images>`` from the
bundle folder (``--bundle_root`` elsewhere). :func:`verify_bundle` checks a bundle with MONAI's bundle tools.

The preprocessing in ``inference.json`` is the config form of :func:`medflare.data.datalist.image_transforms`
(MONAI's transforms with the checkpoint's recorded settings); the tests check that both give the same image and
the same label maps.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any, Dict, List, Optional

import torch

from ..segmentation.networks import FeatureUNet
from .provenance import summary_lines
from .trained_model import TrainedModel

# MONAI's published metadata schema (verify_metadata downloads it; offline, give a local copy)
METADATA_SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
UNET_MODELS = ("unet", "unet_domain")
IMAGE_GLOB = "*.nii*"


class BundleError(ValueError):
    """A model that cannot be exported as a bundle, or a bundle that fails MONAI's checks."""


def unet_arguments(model_record: Dict[str, Any]) -> Dict[str, Any]:
    """Constructor arguments of the plain MONAI ``UNet`` equivalent to a recorded medflare UNet (defaults filled in).

    Raises:
        BundleError: the recorded network is not one of medflare's UNets.
    """
    spec = dict(model_record)
    name = spec.pop("name")
    if name not in UNET_MODELS:
        raise BundleError(f"bundle export supports medflare's UNets {UNET_MODELS}, not '{name}'")
    params = inspect.signature(FeatureUNet.__init__).parameters
    args = {k: p.default for k, p in params.items() if k != "self"}
    args.update({k: v for k, v in spec.items() if k in params})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}


def unet_state_dict(model: TrainedModel, unet_args: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights of a plain MONAI ``UNet`` (medflare extras such as a domain head are left out), checked to load."""
    from monai.networks.nets import UNet

    target = UNet(**unet_args)
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in target.state_dict()}
    target.load_state_dict(weights)  # strict: every UNet weight is there with its shape
    return weights


def intensity_config(preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """The MONAI transform config of the recorded intensity scaling (see
    :func:`medflare.data.datalist.intensity_transform`)."""
    if preprocessing["intensity"] == "minmax":
        return {"_target_": "ScaleIntensityd", "keys": "image", "channel_wise": True}
    if preprocessing["intensity"] == "zscore":
        return {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}
    low, high = preprocessing["window"]
    return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": low, "a_max": high, "b_min": 0.0,
            "b_max": 1.0, "clip": True}


def preprocessing_config(preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """The config form of :func:`medflare.data.datalist.image_transforms` (without medflare's input checks)."""
    steps: List[Dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        intensity_config(preprocessing),
    ]
    if preprocessing.get("spatial_size"):
        steps.append({"_target_": "Resized", "keys": "image", "spatial_size": preprocessing["spatial_size"],
                      "mode": "area"})
    steps.append({"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"})
    return {"_target_": "Compose", "transforms": steps}


def inferer_config(preprocessing: Dict[str, Any]) -> Dict[str, Any]:
    """Sliding-window inference when the job evaluated with windows (``eval_roi_size``), else whole images."""
    roi = preprocessing.get("eval_roi_size")
    if roi:
        return {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 4, "overlap": 0.25}
    return {"_target_": "SimpleInferer"}


def inference_config(model: TrainedModel, unet_args: Dict[str, Any]) -> Dict[str, Any]:
    """``configs/inference.json``: one NIfTI label map per image of ``dataset_dir``, written to ``output_dir``."""
    pre = model.preprocessing
    predict_steps = ["$functools.partial(torch.unsqueeze, dim=0)", "$functools.partial(torch.Tensor.to, device=@device)",
                     "$functools.partial(@inferer, network=@network)", "$functools.partial(torch.squeeze, dim=0)"]
    return {
        "imports": ["$import functools", "$import glob", "$import os"],
        "bundle_root": ".",
        "dataset_dir": "$@bundle_root + '/images'",
        "output_dir": "$@bundle_root + '/eval'",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "datalist": f"$[{{'image': f}} for f in sorted(glob.glob(os.path.join(@dataset_dir, '{IMAGE_GLOB}')))]",
        "network_def": {"_target_": "UNet", **unet_args},
        "network": "$@network_def.to(@device).eval()",
        "preprocessing": preprocessing_config(pre),
        "inferer": inferer_config(pre),
        "predict": {"_target_": "Lambdad", "keys": "image", "overwrite": "pred",
                    "func": {"_target_": "Compose", "transforms": predict_steps}},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False, "to_tensor": True, "device": "cpu"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
             "output_ext": ".nii.gz", "resample": False, "separate_folder": False, "output_dtype": "$numpy.uint8",
             "print_log": False},
            {"_target_": "DeleteItemsd", "keys": ["image", "pred"]},
        ]},
        "segment_case": {"_target_": "Compose", "transforms": ["@preprocessing", "@predict", "@postprocessing"]},
        "initialize": ["$torch.set_grad_enabled(False)",
                       "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))"],
        "run": ["$print('segmenting', len(@datalist), 'images of', @dataset_dir, 'into', @output_dir)",
                "$list(map(@segment_case, @datalist))"],
    }


def _versions() -> Dict[str, str]:
    import monai
    import numpy

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__}


def metadata(model: TrainedModel, version: str = "0.1.0") -> Dict[str, Any]:
    """``configs/metadata.json`` in MONAI's schema, with the provenance record under ``medflare_provenance``."""
    import nibabel

    pre, record = model.preprocessing, model.provenance
    job, ckpt = record.get("job", {}), record.get("checkpoint", {})
    class_names = pre.get("class_names") or [str(i) for i in range(pre["num_classes"])]
    spatial = pre.get("spatial_size") or pre.get("eval_roi_size")
    if not spatial:
        raise BundleError(f"{model.source}: neither spatial_size nor eval_roi_size is recorded, so the network's "
                          "input size is unknown")
    tensor = {"type": "image", "dtype": "float32", "spatial_shape": list(spatial), "is_patch_data": False}
    return {
        "schema": METADATA_SCHEMA,
        "version": version,
        "changelog": {version: f"exported by medflare from job '{job.get('name')}' (model '{ckpt.get('model')}', "
                               f"{ckpt.get('rounds_completed')} rounds)"},
        **_versions(),
        "required_packages_version": {"nibabel": nibabel.__version__},
        "name": f"medflare {job.get('name', 'model')} segmentation ({ckpt.get('model')})",
        "task": f"{pre['spatial_dims']}D segmentation of {', '.join(class_names[1:])}",
        "description": "A UNet trained by federated learning with medflare (NVIDIA FLARE); see docs/README.md.",
        "authors": "medflare federation",
        "copyright": "the federation's sites",
        "data_type": "nifti",
        "image_classes": f"{pre['in_channels']} channel(s), intensity '{pre['intensity']}', resized to {spatial}",
        "label_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(class_names)),
        "pred_classes": ", ".join(f"{i}: {n}" for i, n in enumerate(class_names)),
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "magnitude", "modality": "any", "num_channels": pre["in_channels"],
                                 "value_range": [], "channel_def": {str(i): "image" for i in range(pre["in_channels"])}}},
            "outputs": {"pred": {**tensor, "format": "segmentation", "num_channels": pre["num_classes"],
                                 "value_range": [], "channel_def": {str(i): n for i, n in enumerate(class_names)}}},
        },
        "medflare_provenance": record,
    }


def readme(model: TrainedModel, meta: Dict[str, Any]) -> str:
    """``docs/README.md``: the model, how to run it, and its provenance with the cross-site table."""
    pre = model.preprocessing
    return "\n".join([
        f"# {meta['name']}", "",
        f"{meta['task']} ({meta['label_classes']}), exported from a medflare checkpoint (`{os.path.basename(model.source)}`).",
        "", "## Run", "",
        "From this folder, on a folder of NIfTI images (one label map `<image>_seg.nii.gz` per image, with the image's "
        "affine and shape):", "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/images "
        "--output_dir /path/to/output",
        "```", "",
        f"Preprocessing (the training sites' loader): read, channel first, intensity `{pre['intensity']}`"
        + (f" (window {pre['window']})" if pre.get("window") else "")
        + (f", resize to {pre['spatial_size']} (area)" if pre.get("spatial_size") else "")
        + "; the probabilities are taken back to each image's grid with MONAI's `Invertd`, then the argmax is saved.",
        "", "## Provenance", "", *summary_lines(model.provenance), "",
    ])


def export_bundle(model: TrainedModel, out_dir: str, version: str = "0.1.0") -> str:
    """Write ``model`` as a MONAI bundle into ``out_dir`` (created); returns ``out_dir``.

    Raises:
        BundleError: the model is not a segmentation UNet, or its input size is unknown.
    """
    if model.task != "segmentation":
        raise BundleError(f"{model.source} holds a {model.task} model; bundle export supports segmentation models")
    unet_args = unet_arguments(model.provenance["model"])
    meta = metadata(model, version)
    for sub in ("configs", "models", "docs"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    torch.save(unet_state_dict(model, unet_args), os.path.join(out_dir, "models", "model.pt"))
    for name, content in (("metadata.json", meta), ("inference.json", inference_config(model, unet_args))):
        with open(os.path.join(out_dir, "configs", name), "w") as f:
            json.dump(content, f, indent=2)
    with open(os.path.join(out_dir, "docs", "README.md"), "w") as f:
        f.write(readme(model, meta))
    return out_dir


def verify_bundle(bundle_dir: str, schema_file: Optional[str] = None) -> Dict[str, str]:
    """Check a bundle with MONAI's bundle tools; returns ``{check: outcome}``.

    - ``config``: MONAI's ``ConfigParser`` reads the metadata and config and builds every component
      (network, preprocessing, inferer, postprocessing);
    - ``net_in_out``: MONAI's ``verify_net_in_out`` runs the network on data shaped as the metadata says;
    - ``weights``: ``models/model.pt`` loads into the configured network;
    - ``metadata``: MONAI's ``verify_metadata`` against the published schema, when ``schema_file`` (a local copy of
      it) is given or the schema can be downloaded, and ``jsonschema`` is installed; otherwise reported as skipped.

    Raises:
        BundleError: a check failed (its message says which).
    """
    from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
    from monai.utils import optional_import

    meta_file = os.path.join(bundle_dir, "configs", "metadata.json")
    config_file = os.path.join(bundle_dir, "configs", "inference.json")
    outcome: Dict[str, str] = {}
    try:
        parser = ConfigParser()
        parser.read_meta(meta_file)
        parser.read_config(config_file)
        parser["bundle_root"] = bundle_dir
        for component in ("network_def", "preprocessing", "inferer", "postprocessing", "segment_case"):
            parser.get_parsed_content(component)
        outcome["config"] = "ok"
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file, device="cpu")
        outcome["net_in_out"] = "ok"
        state = torch.load(os.path.join(bundle_dir, "models", "model.pt"), map_location="cpu", weights_only=True)
        parser.get_parsed_content("network_def").load_state_dict(state)
        outcome["weights"] = "ok"
    except Exception as e:
        raise BundleError(f"bundle {bundle_dir} fails MONAI's checks after {sorted(outcome)}: {e}") from e
    _, has_jsonschema = optional_import("jsonschema")
    if not has_jsonschema:
        outcome["metadata"] = "skipped (MONAI's verify_metadata needs the jsonschema package)"
        return outcome
    try:
        verify_metadata(meta_file=meta_file, filepath=schema_file or os.path.join(bundle_dir, ".schema.json"))
        outcome["metadata"] = "ok"
    except Exception as e:  # the schema cannot be fetched (offline) and no local copy was given
        if "Failed validating" in str(e):
            raise BundleError(f"{meta_file} fails MONAI's metadata schema: {e}") from e
        outcome["metadata"] = f"skipped (schema not available: {type(e).__name__})"
    return outcome
