"""A site's own rules on what its executor may send, whatever the job says (``local/medflare_policy.json``).

Written by ``site_configs/install_site.py`` from ``site_configs/templates/medflare_policy.json``::

    {"share_training_curves": false, "share_local_model": false, "send_weight_differences": false}

``share_training_curves``
    Stream per-epoch training losses and local metrics to the server as TensorBoard events (FLARE's ``TBWriter``
    + ``ConvertToFedEvent``). These events do not pass through the site's result filters. Off: the curves stay in
    the site's log.
``share_local_model``
    Answer cross-site evaluation's ``submit_model`` task, i.e. send this site's last *un-averaged* local model,
    which the server then sends to every other site for scoring. Off: the site answers ``EMPTY_RESULT``.
``send_weight_differences``
    Send ``WEIGHT_DIFF`` (local minus received global model) instead of ``WEIGHTS``, so that FLARE's
    ``PercentilePrivacy`` / ``SVTPrivacy`` filters (which treat their input as a difference) can act on it.

A site without the file (the simulator, research set-ups) keeps the research defaults of :data:`RESEARCH_DEFAULT`:
curves and local models shared, full weights sent. A file that leaves a key out gets the restrictive value
(``false``). Unknown keys or non-boolean values are an error naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Optional

POLICY_FILE = "medflare_policy.json"


class PolicyError(ValueError):
    """The site's policy file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class SitePolicy:
    """What this site's executor may send (see the module docstring)."""

    share_training_curves: bool = False
    share_local_model: bool = False
    send_weight_differences: bool = False
    source: str = "defaults"


RESEARCH_DEFAULT = SitePolicy(share_training_curves=True, share_local_model=True, send_weight_differences=False,
                              source=f"no {POLICY_FILE} (research defaults)")
KEYS = tuple(f.name for f in fields(SitePolicy) if f.name != "source")


def parse_site_policy(raw: object, source: str) -> SitePolicy:
    """Validate a policy object (missing keys take the restrictive value ``False``)."""
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: expected a JSON object")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise PolicyError(f"{source}: unknown keys {unknown} (known: {list(KEYS)})")
    for key, value in raw.items():
        if not isinstance(value, bool):
            raise PolicyError(f"{source}: '{key}' must be true or false, got {value!r}")
    return SitePolicy(source=source, **raw)


def read_site_policy(local_dir: Optional[str]) -> SitePolicy:
    """The policy in ``<local_dir>/medflare_policy.json``, or :data:`RESEARCH_DEFAULT` if there is none."""
    if not local_dir:
        return RESEARCH_DEFAULT
    path = os.path.join(local_dir, POLICY_FILE)
    if not os.path.isfile(path):
        return RESEARCH_DEFAULT
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PolicyError(f"site policy {path} cannot be read: {e}") from None
    return parse_site_policy(raw, path)
