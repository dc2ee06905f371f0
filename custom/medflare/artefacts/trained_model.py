"""A trained medflare model ready to use: its network with the weights loaded, and its provenance record.

Where a model comes from:

- a checkpoint file written by the persistor (``FL_global_model.pt``, ``best_FL_global_model.pt``);
- a server run folder (``<workspace>/server/simulate_job``, or a downloaded job) and a model name: ``"global"``,
  ``"best_global"``, or a site's name for the model the site submitted to cross-site evaluation, which kept it
  (``cross_site_val/model_shareables/<site>``): the site's personal model where it keeps one (``ditto``,
  ``fedbn_ft``), else its last local model. A site model takes its record from the global checkpoint (same
  network and preprocessing) with ``checkpoint.model`` set to the site and its own row of the cross-site results.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Dict, List

import torch

from ..networks import build_model
from .provenance import SERVER_MODELS, ProvenanceError, plain, read_provenance

SITE_MODELS_DIR = os.path.join("cross_site_val", "model_shareables")


@dataclass
class TrainedModel:
    """A network in eval mode with its weights, and the record that says how to use it.

    Attributes:
        network: the model (on the CPU; move it with ``.to(device)``).
        provenance: its provenance record (see :mod:`medflare.artefacts.provenance`).
        name: ``"global"``, ``"best_global"`` or a site name.
        source: the file the weights came from.
    """

    network: torch.nn.Module
    provenance: Dict[str, Any]
    name: str
    source: str

    @property
    def task(self) -> str:
        return self.provenance["task"]

    @property
    def preprocessing(self) -> Dict[str, Any]:
        return self.provenance["preprocessing"]

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.network.state_dict()


def build_network(provenance: Dict[str, Any], weights: Dict[str, Any], source: str) -> torch.nn.Module:
    """The recorded network with ``weights`` loaded (eval mode, CPU).

    Raises:
        ProvenanceError: the weights do not fit the recorded network (names the file).
    """
    spec = dict(provenance["model"])
    network = build_model(spec.pop("name"), **spec)
    try:
        network.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    except RuntimeError as e:
        raise ProvenanceError(f"{source}: weights do not fit the recorded network {provenance['model']}: {e}") from e
    return network.eval()


def load_checkpoint(path: str) -> TrainedModel:
    """A persistor checkpoint file as a :class:`TrainedModel`.

    Raises:
        FileNotFoundError: no such file.
        ProvenanceError: the file has no provenance record (an old checkpoint) or its weights do not fit it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    record = read_provenance(checkpoint, path)
    weights = checkpoint["model"] if "model" in checkpoint else checkpoint
    return TrainedModel(build_network(record, weights, path), record, record["checkpoint"]["model"], path)


def available_models(run_dir: str) -> List[str]:
    """Names of the models a server run folder holds: ``global``, ``best_global`` and the kept site models."""
    names = [n for n, (_, f) in SERVER_MODELS.items() if os.path.isfile(os.path.join(run_dir, "app_server", f))]
    site_dir = os.path.join(run_dir, SITE_MODELS_DIR)
    if os.path.isdir(site_dir):
        names += sorted(f for f in os.listdir(site_dir) if not f.startswith("SRV_"))
    return names


def load_site_model(run_dir: str, site: str) -> TrainedModel:
    """A site's last local model, as cross-site evaluation kept it, with the global checkpoint's record."""
    from nvflare.apis.dxo import from_file
    from nvflare.app_common.decomposers import common_decomposers

    common_decomposers.register()  # numpy arrays in the kept DXO

    path = os.path.join(run_dir, SITE_MODELS_DIR, site)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no local model of site '{site}' in {os.path.dirname(path)} (models in this run: "
                                f"{available_models(run_dir)})")
    global_model = load_checkpoint(os.path.join(run_dir, "app_server", SERVER_MODELS["global"][1]))
    record = copy.deepcopy(global_model.provenance)
    record["checkpoint"]["model"] = site
    cross = record.get("cross_site")
    if cross:
        cross["model"] = site
        cross["metrics"] = {}  # the global record keeps only its own model's metrics; the matrix row stays
    weights = from_file(path).data
    return TrainedModel(build_network(record, weights, path), plain(record), site, path)


def load_trained_model(path: str, model: str = "global") -> TrainedModel:
    """A checkpoint file, or model ``model`` of a server run folder or workspace.

    Args:
        path: a checkpoint file; a server run folder (holds ``app_server/``); or a simulator workspace (holds
            ``server/simulate_job``).
        model: for a folder: ``"global"``, ``"best_global"`` or a site name.
    """
    if os.path.isfile(path):
        return load_checkpoint(path)
    run_dir = path
    if not os.path.isdir(os.path.join(run_dir, "app_server")):
        run_dir = os.path.join(path, "server", "simulate_job")
    if not os.path.isdir(os.path.join(run_dir, "app_server")):
        raise FileNotFoundError(f"{path} is neither a checkpoint file nor a server run folder (with app_server/)")
    if model in SERVER_MODELS:
        return load_checkpoint(os.path.join(run_dir, "app_server", SERVER_MODELS[model][1]))
    return load_site_model(run_dir, model)
