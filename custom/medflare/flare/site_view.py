"""What one site receives of the server's bookkeeping: only its own entries.

The aggregators store, in the global model's meta, every site's aggregation weight
(``medflare_aggregation_weights``) and the fairness rules' state (``medflare_aggregator_state``: EMA weights,
mixture weights, FedCE's per-site histories). The server needs them; a site needs at most its own weight (FedCE's
minus model). :func:`site_meta` keeps, of the ``medflare_*`` keys, only the site's own weight
(:data:`SITE_WEIGHT_KEY`), the ring relay's peer (:data:`PEER_SITE_KEY`) and the other sites' feature statistics
of FedDA's statistics mode (:data:`PEER_FEATURE_STATS_KEY`, which the controller adds after this restriction);
other (FLARE) keys pass unchanged.
:func:`site_view` applies it to a task about to be sent to one site (the controller calls it for every train task,
on the copy FLARE makes for that site).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.shareable import Shareable

from ..keys import AGGREGATION_WEIGHTS_KEY, MEDFLARE_PREFIX, PEER_FEATURE_STATS_KEY, PEER_SITE_KEY, SITE_WEIGHT_KEY

KEPT_KEYS = frozenset({SITE_WEIGHT_KEY, PEER_SITE_KEY, PEER_FEATURE_STATS_KEY})


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
