"""FLARE aggregator: validates each site's update and averages the accepted ones.

:class:`WeightedAggregator` is sample-weighted FedAvg (the weight of site i is its number of training samples).
Methods that weight sites differently subclass it and override :meth:`WeightedAggregator.site_weights`;
everything they read comes from the scalar statistics the sites put in the result's meta, never from site data.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.app_constant import AppConstants

from .aggregation import UpdateError, check_update, sample_weights, weight_difference, weighted_average

AGGREGATION_WEIGHTS_KEY = "medflare_aggregation_weights"


class WeightedAggregator(Aggregator):
    """Sample-weighted average of full model weights, refusing malformed or non-finite updates.

    Args:
        on_invalid_update: ``"abort"`` stops the job with an error naming the site (default: a bad update never
            reaches the global model unnoticed); ``"skip"`` logs the error and aggregates the other sites.
        output: ``"weights"`` (default) returns the averaged weights, for FLARE's ``FullModelShareableGenerator``;
            ``"weight_diff"`` returns the averaged weights minus the current global model, for a server optimiser
            such as FLARE's FedOpt generator (:class:`medflare.server_opt.ServerOptimizer`: FedAvgM, FedAdam).
    """

    def __init__(self, on_invalid_update: str = "abort", output: str = "weights") -> None:
        super().__init__()
        if on_invalid_update not in ("abort", "skip"):
            raise ValueError(f"on_invalid_update must be 'abort' or 'skip', got {on_invalid_update!r}")
        if output not in ("weights", "weight_diff"):
            raise ValueError(f"output must be 'weights' or 'weight_diff', got {output!r}")
        self.on_invalid_update = on_invalid_update
        self.output = output
        self.updates: Dict[str, Dict[str, np.ndarray]] = {}
        self.metas: Dict[str, Dict[str, Any]] = {}

    def site_weights(self, metas: Dict[str, Dict[str, Any]], fl_ctx: FLContext) -> Dict[str, float]:
        """Aggregation weight of each accepted site, from the meta the sites sent (default: sample counts)."""
        return sample_weights({site: float(meta.get(MetaKey.NUM_STEPS_CURRENT_ROUND, 1)) for site, meta in metas.items()})

    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            self.log_warning(fl_ctx, f"site '{site}' returned {rc}; its result is not aggregated")
            return False
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round != current_round:
            self.log_warning(fl_ctx, f"discarding a late result of site '{site}' for round {contribution_round}")
            return False
        if site in self.updates:
            self.log_warning(fl_ctx, f"site '{site}' already contributed to round {current_round}; ignoring the repeat")
            return False
        try:
            dxo = from_shareable(shareable)
            if dxo.data_kind != DataKind.WEIGHTS:
                raise UpdateError(f"site '{site}' sent {dxo.data_kind}, expected {DataKind.WEIGHTS}")
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            reference = global_model.get("weights") if global_model else None
            check_update(site, dxo.data, reference or None)
            n = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND)
            if n is None or not np.isfinite(n) or n <= 0:
                raise UpdateError(f"site '{site}' reported an invalid number of training samples: {n!r}")
        except Exception as e:
            return self._reject(site, str(e), fl_ctx)
        self.updates[site] = dxo.data
        self.metas[site] = dict(dxo.meta)
        return True

    def _reject(self, site: str, reason: str, fl_ctx: FLContext) -> bool:
        if self.on_invalid_update == "abort":
            self.system_panic(f"invalid update rejected: {reason}", fl_ctx)
        else:
            self.log_error(fl_ctx, f"invalid update rejected, aggregating without it: {reason}")
        return False

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        if not self.updates:
            self.system_panic("no valid site update to aggregate this round", fl_ctx)
            return Shareable()
        weights = self.site_weights(self.metas, fl_ctx)
        self.log_info(fl_ctx, "aggregation weights: " + ", ".join(f"{s}={w:.3f}" for s, w in sorted(weights.items())))
        average = weighted_average(self.updates, weights)
        if self.output == "weights":
            out = DXO(DataKind.WEIGHTS, data=average)
        else:
            global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
            out = DXO(DataKind.WEIGHT_DIFF, data=weight_difference(average, global_model.get("weights") or {}))
        out.set_meta_prop(AGGREGATION_WEIGHTS_KEY, {s: float(w) for s, w in weights.items()})
        return out.to_shareable()

    def reset(self, fl_ctx: FLContext) -> None:
        self.updates = {}
        self.metas = {}
