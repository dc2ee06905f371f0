"""What a site needs around its executor: device and thread settings, seeding, moving weights in and out of a
model, and reading the client state file (all without FLARE)."""

from __future__ import annotations

import os
import random
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

STATE_FILE = "medflare_client_state.pt"


def resolve_device(device: str) -> torch.device:
    """``"auto"`` picks CUDA when available; anything else is passed to :class:`torch.device`."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


DEFAULT_NUM_THREADS = 1


def configure_torch(num_threads: int, seed: int) -> int:
    """Fix the CPU thread count and seed every random generator a site uses; returns the thread count set.

    ``num_threads > 0`` sets that many intra-op threads. ``0`` means "not set in the job": the site's
    ``MEDFLARE_NUM_THREADS`` environment variable if present, else :data:`DEFAULT_NUM_THREADS` (1). One thread per
    site keeps the sites of a simulation or POC on one host from competing for cores (oversubscription made
    identical rounds vary 50-fold in time) and makes results reproducible bit for bit on any host, since CPU kernels
    may reduce in a different order with another thread count. A hospital server running one site sets its own
    count (the variable, or the executor argument) and keeps it fixed. GPU training is unaffected.
    """
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    if num_threads == 0:
        env = os.environ.get("MEDFLARE_NUM_THREADS", "")
        try:
            num_threads = int(env) if env else DEFAULT_NUM_THREADS
        except ValueError:
            raise ValueError(f"MEDFLARE_NUM_THREADS must be a positive integer, got {env!r}") from None
        if num_threads < 1:
            raise ValueError(f"MEDFLARE_NUM_THREADS must be a positive integer, got {env!r}")
    torch.set_num_threads(num_threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return num_threads


def weights_to_numpy(model: torch.nn.Module) -> Dict[str, np.ndarray]:
    """A copy of the model's weights as numpy arrays (never views: loading other weights later must not change it)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_weights(model: torch.nn.Module, weights: Dict[str, Any], source: str) -> None:
    """Load ``weights`` (numpy or tensors) into ``model``, with an error that says what does not match."""
    state = model.state_dict()
    missing = sorted(set(state) - set(weights))
    extra = sorted(set(weights) - set(state))
    if missing or extra:
        raise ValueError(f"{source} does not match this site's model: missing {missing[:5]}, unexpected {extra[:5]}; "
                         "check that the server's persistor and the executor use the same model arguments")
    for name, value in weights.items():
        tensor = torch.as_tensor(np.asarray(value))
        if tensor.shape != state[name].shape:
            raise ValueError(f"{source}: parameter '{name}' has shape {tuple(tensor.shape)}, "
                             f"this site's model has {tuple(state[name].shape)}")
        state[name].copy_(tensor.to(state[name].dtype))


class StateError(ValueError):
    """A site's saved client state cannot be restored; the message names the file and the site."""


def read_state_file(path: str, site: str, required: Sequence[str],
                    map_location: Optional[torch.device] = None) -> Optional[Dict[str, Any]]:
    """The client state saved at ``path`` (``None`` when there is none yet), checked to hold ``required`` keys.

    Raises:
        StateError: the file exists but cannot be read (truncated, corrupt, not a state file) or lacks a key. A site
            never starts afresh silently over a state file it could not read.
    """
    if not os.path.exists(path):
        return None
    advice = "move the file away to start this site afresh, or restore it from a backup"
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling, zip and I/O errors all mean the same thing here
        raise StateError(f"site '{site}': client state file {path} cannot be read ({type(e).__name__}: {e}); "
                         f"{advice}") from e
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise StateError(f"site '{site}': client state file {path} lacks {missing}; {advice}")
    return state
