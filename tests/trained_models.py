"""Trained checkpoints for fast tests, written by the persistor's own save path (no FLARE run).

The network comes from :class:`medflare.flare.persistors.ModelPersistor`, the preprocessing record from the
job's executor (:func:`medflare.artefacts.provenance.executor_preprocessing`, as the persistor reads it at the server),
and the file from the persistor's ``save_model_file`` (FLARE's atomic writer plus medflare's finite-weights check).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager

from medflare.segmentation.synthetic import SyntheticSegConfig
from medflare.data.datalist import load_items, read_datalist
from medflare.segmentation.synthetic import ensure_site_dataset
from medflare.flare.persistors import ModelPersistor
from medflare.artefacts.provenance import executor_preprocessing
from medflare.artefacts.trained_model import load_checkpoint


def write_checkpoint(path: str, persistor: ModelPersistor, model_name: str = "global",
                     rounds: int = 3) -> str:
    """Save the persistor's current network as a checkpoint with its provenance record."""
    persistor.persistence_manager = PTModelPersistenceFormatManager(
        {k: v.detach().clone() for k, v in persistor.model.state_dict().items()})
    persistor._job = {"name": "test_job", "id": "simulate_job"}
    persistor._stamp(FLContext(), model_name, rounds)
    persistor.save_model_file(path)
    return path


def segmentation_persistor(executor_args: Optional[Dict[str, Any]] = None,
                           model: Optional[Dict[str, Any]] = None, seed: int = 0) -> ModelPersistor:
    """A persistor whose model fits a ``SegmentationExecutor(**executor_args)`` and records its preprocessing."""
    from medflare.flare.executors import SegmentationExecutor

    executor = SegmentationExecutor(**(executor_args or {}))
    spec = {"name": executor.model_name, **executor.model_args, **(model or {})}
    persistor = ModelPersistor(model=spec, seed=seed, preprocessing=executor_preprocessing(executor))
    persistor.model.eval()
    return persistor


def synthetic_datalist(size: int = 48, n_train: int = 16, n_test: int = 6, spatial_dims: int = 2,
                       site_index: int = 0) -> str:
    """The ``dataset.json`` of one site of a small synthetic benchmark (cached like a site's data)."""
    config = SyntheticSegConfig(n_train=n_train, n_val=4, n_test=n_test, size=size, spatial_dims=spatial_dims)
    return ensure_site_dataset(config, site_index).datalist


def train_briefly(persistor: ModelPersistor, datalist: str, epochs: int = 3) -> None:
    """A few epochs of local training on a datalist's training list, so that Dice scores are not trivial."""
    from medflare.artefacts.inference.segmentation import image_spec
    from medflare.segmentation.training import SegmentationTrainer

    dataset = load_items(read_datalist(datalist, "training"), image_spec(persistor.preprocessing), cache=True)
    trainer = SegmentationTrainer(persistor.model, torch.device("cpu"), lr=0.03, optimizer="sgd")
    trainer.fit(dataset, epochs, batch_size=8, seed=0)
    persistor.model.eval()


def nifti(path: str, array: np.ndarray, affine: Optional[np.ndarray] = None) -> str:
    """Write ``array`` as NIfTI with ``affine`` (default: a non-trivial one) and return the path."""
    import nibabel as nib

    if affine is None:
        affine = np.diag([0.8, 1.3, 2.0, 1.0])
        affine[:3, 3] = [10.0, -4.0, 3.5]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def briefly_trained_model(folder: str) -> tuple:
    """A 2D model trained for a few epochs on a small synthetic site, loaded from its checkpoint in ``folder``;
    returns ``(trained model, the site's datalist)``."""
    datalist = synthetic_datalist()
    persistor = segmentation_persistor({"spatial_size": (32, 32)})
    train_briefly(persistor, datalist)
    return load_checkpoint(write_checkpoint(os.path.join(folder, "FL_global_model.pt"), persistor)), datalist
