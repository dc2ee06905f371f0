"""The server's resume checkpoint: what a job needs to continue after the server process died (pure file handling).

FLARE 2.9 keeps no snapshot of a running job (``persist_components`` does nothing, ``snapshot_storage`` is never
written), so a server crash ends the job. medflare's controllers therefore write, at the end of every round, one file
next to the global model, ``<server run dir>/app_server/medflare_resume.pt``, holding:

- ``next_round`` and the planned ``num_rounds``;
- the global model's weights and its meta (which carries the fairness rules' state, see
  :mod:`medflare.flare.fairness_aggregators`, and the aggregation weights);
- the ring relay's encoders (FedDA-cyclic), one per site that trained in the last round;
- the server optimiser's model and state (FedAvgM/FedAdam momentum), when the job has one;
- the run summary so far (``metrics/``), so the resumed run reports every round.

A new job whose controller has ``resume_from`` pointing at that file continues with round ``next_round``
(``deploy/resume_job.py`` stages it; see ``docs/deployment.md``). The file is read with ``weights_only=True``:
only tensors and plain values, never code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import numpy as np
import torch

from ..common.atomic import torch_save_atomic

RESUME_FILE = "medflare_resume.pt"
FORMAT_VERSION = 1


class ResumeError(ValueError):
    """A resume checkpoint is missing, unreadable or does not fit the job; the message names the file."""


@dataclass
class ResumeState:
    """Everything the server needs to continue a job at ``next_round``.

    Args:
        next_round: the first round the resumed job runs (rounds ``0..next_round-1`` are done).
        num_rounds: the rounds the interrupted job planned.
        weights: the global model after round ``next_round - 1``.
        meta: the global model's meta (fairness state, aggregation weights).
        relay_encoders: FedDA-cyclic's encoders to relay, by site.
        server_optimizer: the server optimiser's state
        (:meth:`medflare.flare.server_optimizer.ServerOptimizer.resume_state`).
        summary: the run summary's data (:class:`medflare.common.results.RunSummary`).
    """

    next_round: int
    num_rounds: int
    weights: Dict[str, np.ndarray]
    meta: Dict[str, Any] = field(default_factory=dict)
    relay_encoders: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)
    server_optimizer: Optional[Dict[str, Any]] = None
    summary: Optional[Dict[str, Any]] = None


def _plain(value: Any) -> Any:
    """JSON fallback for numpy and torch values in a model's meta."""
    if isinstance(value, (np.generic, np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a resume checkpoint")


def _tensors(weights: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.asarray(v)).clone() for k, v in weights.items()}


def _arrays(weights: Dict[str, Any]) -> Dict[str, np.ndarray]:
    return {k: v.cpu().numpy() for k, v in weights.items()}


def save_resume_state(path: str, state: ResumeState) -> None:
    """Write ``state`` to ``path`` atomically (a crash while writing leaves the previous round's file)."""
    payload = {
        "format": FORMAT_VERSION,
        "next_round": int(state.next_round),
        "num_rounds": int(state.num_rounds),
        "weights": _tensors(state.weights),
        "meta_json": json.dumps(state.meta or {}, default=_plain),
        "relay_encoders": {site: _tensors(enc) for site, enc in (state.relay_encoders or {}).items()},
        "server_optimizer": state.server_optimizer,
        "summary_json": json.dumps(state.summary) if state.summary is not None else None,
    }
    torch_save_atomic(payload, path)




def load_resume_state(path: str) -> ResumeState:
    """Read a resume checkpoint.

    Raises:
        ResumeError: naming ``path``: missing, unreadable, another format, or inconsistent rounds.
    """
    if not os.path.isfile(path):
        raise ResumeError(f"resume checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_VERSION:
            raise ValueError(f"not a medflare resume checkpoint of format {FORMAT_VERSION}")
        state = ResumeState(
            next_round=int(raw["next_round"]), num_rounds=int(raw["num_rounds"]), weights=_arrays(raw["weights"]),
            meta=json.loads(raw["meta_json"]),
            relay_encoders={site: _arrays(enc) for site, enc in raw["relay_encoders"].items()},
            server_optimizer=raw.get("server_optimizer"),
            summary=json.loads(raw["summary_json"]) if raw.get("summary_json") else None)
    except Exception as e:
        raise ResumeError(f"resume checkpoint {path} cannot be read ({type(e).__name__}: {e})") from e
    if not 0 < state.next_round <= state.num_rounds:
        raise ResumeError(f"resume checkpoint {path}: next round {state.next_round} is outside 1..{state.num_rounds}")
    return state


def check_resume_fits(state: ResumeState, path: str, model_keys: Iterable[str], num_rounds: int) -> None:
    """Refuse a checkpoint of another model, or one with no round left to run in a job of ``num_rounds``."""
    expected = set(model_keys)
    if set(state.weights) != expected:
        missing, extra = sorted(expected - set(state.weights)), sorted(set(state.weights) - expected)
        raise ResumeError(f"resume checkpoint {path} holds another model: missing {missing[:5]}, "
                          f"unexpected {extra[:5]}")
    if state.next_round >= num_rounds:
        raise ResumeError(f"resume checkpoint {path} is after round {state.next_round - 1}: a job of {num_rounds} "
                          "rounds has nothing left to run (raise num_rounds to train further)")


def summary_before(summary: Optional[Dict[str, Any]], next_round: int) -> Optional[Dict[str, Any]]:
    """The run summary's data without rounds from ``next_round`` on (and without cross-site results)."""
    if summary is None:
        return None
    out = dict(summary)
    out["rounds"] = [r for r in summary.get("rounds") or [] if r.get("round", next_round) < next_round]
    out["cross_site"] = None
    return out
