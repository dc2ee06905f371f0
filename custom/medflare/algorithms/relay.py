"""The ring relay of FedDA-cyclic (pure functions).

Sites are ordered by name into a ring; in round t the server sends site i, along with the global model, the encoder
its ring neighbour ``peer(i)`` (the previous site in the ring) trained in round t-1. Only weights move: the peer's
encoder parameters, never features or images.
"""

from __future__ import annotations

from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np


def encoder_part(weights: Mapping[str, np.ndarray], encoder_keys: Iterable[str]) -> Dict[str, np.ndarray]:
    """The encoder's entries of a full set of model weights."""
    keys = set(encoder_keys)
    missing = keys - set(weights)
    if missing:
        raise KeyError(f"weights lack encoder parameters {sorted(missing)[:5]}")
    return {k: weights[k] for k in sorted(keys)}


def relay_assignments(sites: Sequence[str], previous_encoders: Mapping[str, Mapping[str, np.ndarray]]
                      ) -> Dict[str, Optional[str]]:
    """Which peer's previous-round encoder each of ``sites`` receives this round.

    A site receives its ring neighbour's encoder when that neighbour trained in the previous round; otherwise
    (first round, or the neighbour missed the round) the nearest earlier site in the ring that did, and ``None``
    when no other site has an encoder yet (the site then aligns to the global encoder, as in joint mode).
    """
    ring = sorted(set(sites) | set(previous_encoders))
    out: Dict[str, Optional[str]] = {}
    for site in sites:
        i = ring.index(site)
        out[site] = None
        for step in range(1, len(ring)):
            candidate = ring[i - step]
            if candidate != site and candidate in previous_encoders:
                out[site] = candidate
                break
    return out
