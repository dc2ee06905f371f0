"""FLARE aggregator: validates each site's result and combines the accepted ones.

:class:`WeightedAggregator` is sample-weighted FedAvg (the weight of site i is its number of training samples).
Methods that weight sites differently subclass it and override :meth:`WeightedAggregator.aggregation_weights`;
everything they read comes from the scalar statistics the sites put in the result's meta, never from site data.

What a site may send (see :mod:`medflare.algorithms.aggregation` and :mod:`medflare.common.reports`): ``WEIGHTS`` or
``WEIGHT_DIFF`` (its change from the global model it received), for all or a subset of the model's parameters
(what FLARE's ``ExcludeVars`` filter leaves; a parameter is averaged over the sites that sent it and keeps its
global value if none did), floating-point values where the model has them, finite and below ``max_abs_value``;
a positive integer sample count; statistics inside their documented ranges. Anything else is refused with an error
that names the site (``on_invalid_update``), and so is any failure while aggregating.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.aggregator import Aggregator
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from ..algorithms.aggregation import (MAX_ABS_VALUE, UpdateError, check_update, fill_missing, sample_weights,
                                      to_weights, weight_difference, weighted_average)
from ..keys import AGGREGATION_WEIGHTS_KEY, SITE_REPORT_KEY
from ..common.reports import (DEFAULT_MAX_SAMPLE_RATIO, ReportError, check_sample_count, check_statistics,
                              effective_sample_counts)
from ..algorithms.robust import RobustRule, clip_update, robust_average

ACCEPTED_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


class AggregationError(RuntimeError):
    """Aggregating the accepted updates failed; the message names the round and the sites."""


class WeightedAggregator(Aggregator):
    """Sample-weighted average of the sites' models, refusing malformed, non-finite or out-of-range results.

    Args:
        on_invalid_update: ``"abort"`` stops the job with an error naming the site (default: a bad update never
            reaches the global model unnoticed); ``"skip"`` logs the error and aggregates the other sites.
        output: ``"weights"`` (default) returns the averaged weights, for FLARE's ``FullModelShareableGenerator``;
            ``"weight_diff"`` returns the averaged weights minus the current global model, for a server optimiser
            such as FLARE's FedOpt generator (:class:`medflare.flare.server_optimizer.ServerOptimizer`: FedAvgM,
            FedAdam).
        site_samples: ``{site: number of training samples}`` declared on the server. A site is then weighted by
            ``min(reported, declared)`` and a site without a declaration is refused. Default: no declaration.
        max_sample_ratio: without ``site_samples``, a reported sample count above this multiple of the round's
            median count is weighted as that multiple (default 10; ``null`` turns the cap off). See
            :func:`medflare.common.reports.effective_sample_counts`.
        max_abs_value: largest magnitude of a floating-point value in an update (default 1e6; ``null``: none).
        robust: optional robust rule, e.g. ``{"clip_norm": 5.0, "method": "trimmed_mean", "trim": 1}``
            (:class:`medflare.algorithms.robust.RobustRule`); default off.
    """

    def __init__(self, on_invalid_update: str = "abort", output: str = "weights",
                 site_samples: Optional[Dict[str, int]] = None,
                 max_sample_ratio: Optional[float] = DEFAULT_MAX_SAMPLE_RATIO,
                 max_abs_value: Optional[float] = MAX_ABS_VALUE, robust: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        if on_invalid_update not in ("abort", "skip"):
            raise ValueError(f"on_invalid_update must be 'abort' or 'skip', got {on_invalid_update!r}")
        if output not in ("weights", "weight_diff"):
            raise ValueError(f"output must be 'weights' or 'weight_diff', got {output!r}")
        if site_samples is not None:
            bad = {s: n for s, n in dict(site_samples).items()
                   if not isinstance(n, int) or isinstance(n, bool) or n < 1}
            if bad:
                raise ValueError(f"site_samples must map site names to positive integers, got {bad}")
        if max_sample_ratio is not None and not max_sample_ratio >= 1:
            raise ValueError(f"max_sample_ratio must be >= 1 or null, got {max_sample_ratio!r}")
        self.on_invalid_update = on_invalid_update
        self.output = output
        self.site_samples = dict(site_samples) if site_samples is not None else None
        self.max_sample_ratio = max_sample_ratio
        self.max_abs_value = max_abs_value
        self.robust = RobustRule.from_config(robust)
        self.updates: Dict[str, Dict[str, np.ndarray]] = {}
        self.metas: Dict[str, Dict[str, Any]] = {}
        self.samples: Dict[str, int] = {}

    # ------------------------------------------------------------------ what subclasses change
    def aggregation_weights(self, fl_ctx: FLContext) -> Tuple[Dict[str, float], Optional[Dict[str, np.ndarray]],
                                                               Dict[str, Any]]:
        """(Weight of each accepted site, new global weights or ``None`` for the weighted combination of the
        sites' models, extra meta for the aggregate). Default: sample counts (capped, see ``max_sample_ratio``)."""
        return sample_weights(self.sample_counts(fl_ctx)), None, {}

    # ------------------------------------------------------------------ helpers for subclasses
    def sample_counts(self, fl_ctx: FLContext) -> Dict[str, float]:
        """The sample counts the server weights sites by (declared or capped), logging each change."""
        counts, notes = effective_sample_counts(self.samples, self.site_samples, self.max_sample_ratio)
        for note in notes:
            self.log_warning(fl_ctx, note)
        return counts

    def global_weights(self, fl_ctx: FLContext) -> Optional[Dict[str, np.ndarray]]:
        """The global model the sites received this round (``None`` if the context has none)."""
        model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL) or {}
        return model.get(ModelLearnableKey.WEIGHTS) or None

    def full_updates(self, reference: Mapping[str, np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
        """Every site's full model (the global values where it sent none), clipped when the robust rule clips."""
        out = {}
        for site, update in self.updates.items():
            full = fill_missing(update, reference)
            if self.robust is not None and self.robust.clip_norm is not None:
                full, _ = clip_update(full, reference, self.robust.clip_norm)
            out[site] = full
        return out

    def accepted_weights(self, site: str, fl_ctx: FLContext) -> Optional[Dict[str, np.ndarray]]:
        """The full model of an accepted site (global values for parameters it did not send), or ``None``."""
        if site not in self.updates:
            return None
        reference = self.global_weights(fl_ctx)
        return fill_missing(self.updates[site], reference) if reference else dict(self.updates[site])

    # ------------------------------------------------------------------ FLARE Aggregator
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
            if dxo.data_kind not in ACCEPTED_KINDS:
                raise UpdateError(f"site '{site}' sent {dxo.data_kind}, expected one of {list(ACCEPTED_KINDS)}")
            reference = self.global_weights(fl_ctx)
            if dxo.data_kind == DataKind.WEIGHT_DIFF and reference is None:
                raise UpdateError(f"site '{site}' sent weight differences, but the server has no global model "
                                  "to add them to")
            check_update(site, dxo.data, reference, partial=True, kind=dxo.data_kind, max_abs=self.max_abs_value)
            n = check_sample_count(site, dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND))
            check_statistics(site, dxo.get_meta_prop(SITE_REPORT_KEY))
            weights = to_weights(dxo.data, reference, dxo.data_kind) if reference else dict(dxo.data)
        except UpdateError as e:
            return self.reject(site, str(e), fl_ctx)
        except Exception as e:  # a result that cannot even be read
            return self.reject(site, f"site '{site}' sent a result that cannot be read ({type(e).__name__}: {e})",
                               fl_ctx)
        if reference and len(weights) < len(reference):
            self.log_info(fl_ctx, f"site '{site}' sent {len(weights)} of the {len(reference)} parameters; the others "
                                  "are averaged over the sites that sent them")
        self.updates[site] = weights
        self.metas[site] = dict(dxo.meta)
        self.samples[site] = n
        return True

    def reject(self, site: str, reason: str, fl_ctx: FLContext) -> bool:
        """Refuse a site's result by ``on_invalid_update``; ``reason`` names the site. Returns ``False``."""
        if self.on_invalid_update == "abort":
            self.system_panic(f"invalid update rejected: {reason}", fl_ctx)
        else:
            self.log_error(fl_ctx, f"invalid update rejected, aggregating without it: {reason}")
        return False

    _reject = reject  # earlier name

    def combine(self, weights: Mapping[str, float], fl_ctx: FLContext) -> Dict[str, np.ndarray]:
        """The sites' models combined with ``weights`` (or by the robust rule), as a full model."""
        reference = self.global_weights(fl_ctx)
        if self.robust is None:
            combined = weighted_average(self.updates, weights)
        else:
            if reference is None:
                raise AggregationError("the robust rule needs the global model the sites received")
            combined, norms = robust_average(self.updates, weights, reference, self.robust)
            self.log_info(fl_ctx, "norm of each site's change: "
                          + ", ".join(f"{s}={v:.4g}" for s, v in sorted(norms.items()))
                          + (f" (clipped at {self.robust.clip_norm:g})" if self.robust.clip_norm else ""))
        if reference and set(combined) != set(reference):
            combined = fill_missing(combined, reference)
        return combined

    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        if not self.updates:
            self.system_panic("no valid site update to aggregate this round", fl_ctx)
            return Shareable()
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        try:
            weights, data, extra_meta = self.aggregation_weights(fl_ctx)
            self.log_info(fl_ctx, f"{self.rule_label()} aggregation weights: "
                          + ", ".join(f"{s}={w:.4f}" for s, w in sorted(weights.items())))
            if data is None:
                data = self.combine(weights, fl_ctx)
            check_update("the aggregate", data, max_abs=None)
            reference = self.global_weights(fl_ctx)
            if self.output == "weights":
                out = DXO(DataKind.WEIGHTS, data=data)
            else:
                out = DXO(DataKind.WEIGHT_DIFF, data=weight_difference(data, reference or {}))
        except Exception as e:
            self.system_panic(self.failure_message(e, rnd), fl_ctx)
            return Shareable()
        out.set_meta_prop(AGGREGATION_WEIGHTS_KEY, {s: float(w) for s, w in weights.items()})
        for key, value in extra_meta.items():
            out.set_meta_prop(key, value)
        return out.to_shareable()

    def rule_label(self) -> str:
        return getattr(self, "rule_name", "fedavg")

    def failure_message(self, error: Exception, rnd: Any) -> str:
        """An aggregation failure as one line: the rule, the round, the error, and what each site sent."""
        if isinstance(error, (UpdateError, AggregationError)):
            detail = str(error)
        else:
            detail = f"{type(error).__name__}: {error}"
        sites = "; ".join(f"site '{s}': {self.describe_site(s)}" for s in sorted(self.updates))
        return f"{self.rule_label()} aggregation failed in round {rnd}: {detail} (inputs: {sites})"

    def describe_site(self, site: str) -> str:
        """What a site contributed, for error messages (its sample count and weighting statistics)."""
        stats: List[str] = [f"n={self.samples.get(site)}"]
        report = self.metas.get(site, {}).get(SITE_REPORT_KEY) or {}
        try:
            stats += [f"{k}={v:.4g}" for k, v in check_statistics(site, report).items()]
        except ReportError:
            pass
        return ", ".join(stats)

    def reset(self, fl_ctx: FLContext) -> None:
        self.updates = {}
        self.metas = {}
        self.samples = {}
