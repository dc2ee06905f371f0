"""FLARE aggregators of the fairness suite: thin wrappers of the pure rules in :mod:`medflare.algorithms.fairness`.

Each class is a :class:`~medflare.flare.aggregators.WeightedAggregator` (same validation of updates) whose weights come
from the scalars the sites report in ``meta["medflare_report"]`` (see
:data:`medflare.flare.executors.classification.REPORTED_SCALARS`) and, for q-FedAvg and FedCE, from the global model the
sites received. Nothing here touches site data.

State across rounds (EMA weights, mixture weights, histories) is not kept in the aggregator object: it is written
into the aggregated model's meta under :data:`AGGREGATOR_STATE_KEY`, FLARE's ``FullModelShareableGenerator`` stores that
meta with the global model and ``PTFileModelPersistor`` saves it in the checkpoint's ``meta_props``; every round the
rule reads it back from the global model it is updating. A run resumed from a checkpoint therefore continues with the
state of the round it stopped at, and a restarted server process loses nothing.

Sites missing a round: weights are computed over the sites whose update was accepted; see
:mod:`medflare.algorithms.fairness` for how each rule treats the state of absent and new sites.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from ..algorithms import fairness as fr
from .. import keys
from .aggregators import WeightedAggregator
from ..keys import AGGREGATOR_STATE_KEY, SITE_REPORT_KEY


def stored_state(global_model: Optional[Dict[str, Any]], rule: str) -> Tuple[Dict[str, Any], Optional[int]]:
    """The state ``rule`` left in a global model's meta, and the round it was written in (``({}, None)`` if none)."""
    meta = (global_model or {}).get(ModelLearnableKey.META) or {}
    entry = meta.get(AGGREGATOR_STATE_KEY) or {}
    if entry.get("rule") != rule:
        return {}, None
    return dict(entry.get("state") or {}), entry.get("round")


class FairAggregator(WeightedAggregator):
    """Base class: subclasses implement :meth:`rule`; state persists through the global model's meta.

    Every statistic a rule reads has been checked when the site's result was accepted (type, finite, range:
    :data:`medflare.common.reports.STATISTIC_BOUNDS`); a statistic a rule needs but a site did not send, and any failure
    of the rule itself, stops the round with a message naming the sites (see
    :meth:`~medflare.flare.aggregators.WeightedAggregator.failure_message`).
    """

    rule_name = "fedavg"

    def rule(self, reports: Dict[str, Dict[str, Any]], n_samples: Dict[str, float], state: Dict[str, Any],
             fl_ctx: FLContext) -> Tuple[Dict[str, float], Dict[str, Any], Optional[Dict[str, np.ndarray]]]:
        """Return (per-site weights, new state, new global weights or None for the weighted average)."""
        raise NotImplementedError

    def reference_weights(self, fl_ctx: FLContext) -> Dict[str, np.ndarray]:
        weights = self.global_weights(fl_ctx)
        if not weights:
            raise ValueError(f"{self.rule_name} needs the global model the sites received")
        return weights

    def aggregation_weights(self, fl_ctx: FLContext):
        rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        state, state_round = stored_state(fl_ctx.get_prop(AppConstants.GLOBAL_MODEL), self.rule_name)
        if state_round is not None and rnd is not None and state_round != rnd - 1:
            self.log_info(fl_ctx, f"round {rnd}: continuing from the {self.rule_name} state of round {state_round}")
        reports = {s: dict(m.get(SITE_REPORT_KEY) or {}) for s, m in self.metas.items()}
        weights, new_state, data = self.rule(reports, self.sample_counts(fl_ctx), state, fl_ctx)
        return weights, data, {AGGREGATOR_STATE_KEY: {"rule": self.rule_name, "round": rnd, "state": new_state}}


def _stat(reports: Dict[str, Dict[str, Any]], key: str) -> Dict[str, float]:
    return fr._require(reports, key)


class FedISMAggregator(FairAggregator):
    """FedISM / FedISM+: weights from the sites' sharpness, ``p ∝ (S/ΣS)^q``, EMA with ``beta`` across rounds.

    Args:
        q: sharpness exponent (FFL4MIA's README runs 2.0).
        beta: EMA coefficient of the weights (0.5).
    """

    rule_name = "fedism"

    def __init__(self, q: float = 2.0, beta: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.q, self.beta = q, beta

    def rule(self, reports, n_samples, state, fl_ctx):
        prev = state.get("weights")
        weights = fr.fedism_weights(_stat(reports, keys.SHARPNESS), self.q, self.beta, prev)
        return weights, {"weights": fr.merge_state(prev, weights)}, None


class AFLAggregator(FairAggregator):
    """Agnostic FL: mixture weights by projected gradient ascent on the global model's losses at the sites.

    Args:
        lambda_lr: step size of the mixture-weight ascent.
    """

    rule_name = "afl"

    def __init__(self, lambda_lr: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lambda_lr = lambda_lr

    def rule(self, reports, n_samples, state, fl_ctx):
        used, mixture = fr.afl_step(_stat(reports, keys.LOSS_GLOBAL), state.get("lambda"), self.lambda_lr)
        return used, {"lambda": mixture}, None


class QFedAvgAggregator(FairAggregator):
    """q-FedAvg. ``mode="update"``: the q-FFL server step of Li et al. (needs the global model and a Lipschitz
    estimate ``lipschitz``); ``mode="weights"``: FFL4MIA's shortcut ``p ∝ F^q`` over the local models.

    Args:
        q: fairness exponent.
        lipschitz: L of the q-FFL step (the paper uses 1/lr of local SGD; with Adam local steps the displacement is
            about lr per coordinate and step, so a much smaller L is needed for the model to move).
        mode: ``"update"`` or ``"weights"``.
    """

    rule_name = "qfedavg"

    def __init__(self, q: float = 1.0, lipschitz: float = 0.1, mode: str = "update", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("update", "weights"):
            raise ValueError(f"mode must be 'update' or 'weights', got {mode!r}")
        if mode == "update" and self.robust is not None and not self.robust.uses_weights:
            raise ValueError("q-FedAvg's update mode computes the model itself: its robust rule can clip "
                             f"(clip_norm) but not use method {self.robust.method!r}")
        self.q, self.lipschitz, self.mode = q, lipschitz, mode

    def rule(self, reports, n_samples, state, fl_ctx):
        losses = _stat(reports, keys.LOSS_GLOBAL)
        if self.mode == "weights":
            return fr.qffl_weights(losses, self.q), {}, None
        reference = self.reference_weights(fl_ctx)
        new, coef = fr.qfedavg_update(reference, self.full_updates(reference), losses, self.q, self.lipschitz)
        return coef, {}, new


class FairFedAggregator(FairAggregator):
    """FairFed with the balanced accuracy of the global model as the fairness signal.

    Args:
        beta: step of the weight update.
    """

    rule_name = "fairfed"

    def __init__(self, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.beta = beta

    def rule(self, reports, n_samples, state, fl_ctx):
        prev = state.get("weights")
        weights = fr.fairfed_weights(_stat(reports, keys.BACC_GLOBAL_TRAIN), n_samples, prev, self.beta)
        return weights, {"weights": fr.merge_state(prev, weights)}, None


class FedGAAggregator(FairAggregator):
    """FedGA: weights moved towards sites where the aggregated model generalises worse than their local model.

    A site's gap ``F_i(w^t) - F_i(w_i^t)`` is used only if its previous local model is from the previous round.

    Args:
        step: initial step (decays linearly over the rounds and is divided by the number of sites).
    """

    rule_name = "fedga"

    def __init__(self, step: float = 0.05, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.step = step

    def rule(self, reports, n_samples, state, fl_ctx):
        rnd = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        num_rounds = int(fl_ctx.get_prop(AppConstants.NUM_ROUNDS) or rnd + 1)
        gaps = {}
        for site, r in reports.items():
            if r.get(keys.LOSS_PREV_LOCAL) is not None and r.get(keys.PREV_LOCAL_ROUND) == rnd - 1:
                gaps[site] = float(r[keys.LOSS_GLOBAL]) - float(r[keys.LOSS_PREV_LOCAL])
        prev = state.get("weights")
        weights = fr.fedga_weights(gaps, prev, max(rnd - 1, 0), num_rounds, self.step, present=reports)
        return weights, {"weights": fr.merge_state(prev, weights)}, None


class FedCEAggregator(FairAggregator):
    """FedCE: contribution estimate from gradient-space (update cosine) and data-space (minus model) scores.

    Args:
        mode: ``"times"`` (FFL4MIA) or ``"plus"`` (NVFlare).
    """

    rule_name = "fedce"

    def __init__(self, mode: str = "times", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("times", "plus"):
            raise ValueError(f"mode must be 'times' or 'plus', got {mode!r}")
        self.mode = mode

    def rule(self, reports, n_samples, state, fl_ctx):
        reference = self.reference_weights(fl_ctx)
        param_keys = [k for k in sorted(reference) if fr.is_trainable_key(k)
                and np.issubdtype(np.asarray(reference[k]).dtype, np.floating)]
        diffs = {s: {k: np.asarray(u[k], np.float64) - np.asarray(reference[k], np.float64) for k in param_keys}
                 for s, u in self.full_updates(reference).items()}
        scores = {s: r.get(keys.FEDCE_MINUS_SCORE) for s, r in reports.items()}
        weights, new_state = fr.fedce_step(diffs, scores, state, param_keys, self.mode)
        return weights, new_state, None
