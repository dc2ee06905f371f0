"""Model persistor: keeps the last and the best global model, and never writes a corrupted checkpoint."""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np
import torch
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from .networks import build_model


class CheckpointError(RuntimeError):
    """A model about to be saved contains non-finite values."""


def check_finite_state(state: Dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming the first parameter with NaN or infinite values."""
    for name, value in state.items():
        arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
            raise CheckpointError(f"refusing to save a global model whose parameter '{name}' is not finite")


class SegmentationModelPersistor(PTFileModelPersistor):
    """:class:`PTFileModelPersistor` that builds its network from a job argument and checks weights before saving.

    It writes ``FL_global_model.pt`` (last round) and ``best_FL_global_model.pt`` (best mean Dice, as chosen by
    ``IntimeModelSelector``) into the server's app folder, atomically.

    Args:
        model: ``{"name": "unet", **constructor kwargs}`` (see :func:`medflare.networks.build_model`).
        seed: seed of the initial weights, so that runs of different methods start from the same model.
        **kwargs: passed to :class:`PTFileModelPersistor` (``source_ckpt_file_full_name`` resumes from a checkpoint).
    """

    def __init__(self, model: Optional[Dict[str, Any]] = None, seed: int = 0, **kwargs: Any) -> None:
        spec = dict(model or {})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            network = build_model(spec.pop("name", "unet"), **spec)
        super().__init__(model=network, **kwargs)
        self.seed = seed

    def save_model_file(self, save_path: str) -> None:
        check_finite_state(self.persistence_manager.to_persistence_dict()["model"])
        super().save_model_file(save_path)
