"""What one site receives of the server's bookkeeping: only its own entries.

The aggregators store, in the global model's meta, every site's aggregation weight
(``medflare_aggregation_weights``) and the fairness rules' state (``medflare_aggregator_state``: EMA weights,
mixture weights, FedCE's per-site histories). The server needs them; a site needs at most its own weight (FedCE's
minus model). :func:`site_meta` keeps, of the ``medflare_*`` keys, only the site's own weight
(:data:`SITE_WEIGHT_KEY`) and the ring relay's peer (:data:`PEER_SITE_KEY`); other (FLARE) keys pass unchanged.
:func:`site_view` applies it to a task about to be sent to one site (the controller calls it for every train task,
on the copy FLARE makes for that site).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.shareable import Shareable

MEDFLARE_PREFIX = "medflare_"
AGGREGATION_WEIGHTS_KEY = "medflare_aggregation_weights"
SITE_WEIGHT_KEY = "medflare_site_weight"
"""Meta key of the receiving site's own aggregation weight in the previous round (absent if it had none)."""
PEER_SITE_KEY = "medflare_peer_site"
"""Meta key of the site whose encoder the ring relay sends along (FedDA-cyclic)."""
KEPT_KEYS = frozenset({SITE_WEIGHT_KEY, PEER_SITE_KEY})


def site_meta(meta: Mapping[str, Any], site: str) -> Dict[str, Any]:
    """``meta`` as ``site`` may see it: FLARE's keys, the site's own weight, the relay's peer; no other site's
    names, weights or histories."""
    out = {k: v for k, v in meta.items() if not str(k).startswith(MEDFLARE_PREFIX) or k in KEPT_KEYS}
    weights = meta.get(AGGREGATION_WEIGHTS_KEY)
    if isinstance(weights, Mapping) and site in weights:
        out[SITE_WEIGHT_KEY] = float(weights[site])
    return out


def _restricted(dxo: DXO, site: str) -> DXO:
    data = dxo.data
    if dxo.data_kind == DataKind.COLLECTION and isinstance(data, Mapping):
        data = {k: _restricted(v, site) if isinstance(v, DXO) else v for k, v in data.items()}
    return DXO(dxo.data_kind, data=data, meta=site_meta(dxo.meta or {}, site))


def site_view(task_data: Shareable, site: str) -> Shareable:
    """Replace the DXO in ``task_data`` (one site's copy of a task) by its restricted view, in place. Returns it.
    A task without a DXO is left as it is."""
    try:
        dxo = from_shareable(task_data)
    except Exception:  # no DXO in this task: nothing of ours to restrict
        return task_data
    return _restricted(dxo, site).update_shareable(task_data)
