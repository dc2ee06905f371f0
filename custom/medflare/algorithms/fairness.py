"""Fair aggregation rules as pure functions (numpy only; no FLARE, no torch, no site data).

Every rule maps the scalar statistics the sites report (and the rule's own state of the previous round) to
aggregation weights or to a new global model. The FLARE aggregators in :mod:`medflare.flare.fairness_aggregators` call
these functions; the unit tests check them on hand-made inputs.

Sites that miss a round
    Every stateful rule takes the previous state as ``{site: value}`` and the current reports of the sites that
    *did* answer. The weights are always computed over the answering sites only (they sum to 1 over them). The state
    of an absent site is kept unchanged, so it resumes where it left off when it returns; a site never seen before
    starts from the rule's initial value (documented per function).

The constants below name the statistics the rules read from each site's report (``meta["medflare_report"]``,
written by :mod:`medflare.flare.executors.classification`).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .aggregation import Weights

EPS = 1e-10


def normalize(values: Mapping[str, float], fallback: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """``v_i / sum_j v_j``; non-negative finite input required. A zero sum gives ``fallback`` (default uniform)."""
    if not values:
        raise ValueError("no sites to weight")
    arr = np.array([float(values[s]) for s in values])
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"weights must be finite and non-negative, got {dict(values)}")
    total = float(arr.sum())
    if total <= 0:
        if fallback is not None:
            return normalize(fallback)
        return {s: 1.0 / len(values) for s in values}
    return {s: float(values[s]) / total for s in values}


def _require(stats: Mapping[str, Mapping[str, float]], key: str) -> Dict[str, float]:
    out = {}
    for site, report in stats.items():
        value = report.get(key) if isinstance(report, Mapping) else None
        if value is None or not np.isfinite(float(value)):
            raise ValueError(f"site '{site}' did not report a finite '{key}' (got {value!r})")
        out[site] = float(value)
    return out


def _previous_for(present: Iterable[str], prev: Optional[Mapping[str, float]],
                  initial: Mapping[str, float]) -> Dict[str, float]:
    """Previous weights of the present sites (a new site takes ``initial[site]``), renormalised over them."""
    prev = prev or {}
    return normalize({s: float(prev[s]) if s in prev else float(initial[s]) for s in present}, fallback=initial)


def merge_state(prev: Optional[Mapping[str, float]], current: Mapping[str, float]) -> Dict[str, float]:
    """State to keep: the current values of present sites, unchanged values of absent ones."""
    out = dict(prev or {})
    out.update({s: float(v) for s, v in current.items()})
    return out


# ---------------------------------------------------------------------------------------------------------- FedISM
def fedism_weights(sharpness: Mapping[str, float], q: float = 2.0, beta: float = 0.5,
                   prev: Optional[Mapping[str, float]] = None) -> Dict[str, float]:
    """FedISM / FedISM+ aggregation weights (FFL4MIA rule).

    ``p_i = S_i / sum_j S_j``, ``p_i = (p_i + 1e-10)^q`` renormalised; then ``a = p`` in the first round
    (``prev`` is None or shares no site) and ``a = beta * p + (1 - beta) * a_prev`` afterwards. ``a_prev`` is the
    previous weights of the present sites renormalised over them; a new site's previous weight is its own ``p``.
    Sharpness below 1e-10 is raised to 1e-10 (as the client clamps it).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    s = {k: max(float(v), EPS) for k, v in sharpness.items()}
    if not all(np.isfinite(v) for v in s.values()):
        raise ValueError(f"non-finite sharpness {dict(sharpness)}")
    p = normalize(s)
    p = normalize({k: (v + EPS) ** q for k, v in p.items()})
    if not prev or not set(prev) & set(p):
        return p
    a_prev = _previous_for(p, prev, p)
    return normalize({k: beta * p[k] + (1.0 - beta) * a_prev[k] for k in p})


# ----------------------------------------------------------------------------------------------------- q-FedAvg
def qffl_weights(losses: Mapping[str, float], q: float = 1.0) -> Dict[str, float]:
    """FFL4MIA's q-FedAvg / AFL shortcut: ``p_i ∝ (F_i + 1e-10)^q`` (q >= 100 approximates AFL's argmax)."""
    return normalize({s: (max(float(v), 0.0) + EPS) ** q for s, v in losses.items()})


def qfedavg_update(global_weights: Weights, local_weights: Mapping[str, Weights], losses: Mapping[str, float],
                   q: float = 1.0, lipschitz: float = 1.0) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """The q-FFL server step of Li et al. (ICLR'20), ``q-FedAvg``.

    ``dw_i = L (w - w_i)``, ``D_i = F_i^q dw_i``, ``h_i = q F_i^(q-1) ||dw_i||^2 + L F_i^q``,
    ``w_new = w - sum_i D_i / sum_i h_i``. ``||dw_i||`` runs over the model's parameters (floating-point entries
    that are not BatchNorm statistics, see :func:`is_trainable_key`); the step is applied to every floating-point
    entry. As ``L -> 0`` the step tends to the ``F^q``-weighted average of the local models. Integer entries
    (counters) take the rounded average of the sites'. Returns the new weights and the effective per-site
    coefficients ``c_i = L F_i^q / sum_j h_j`` (so that ``w_new = (1 - sum c) w + sum c_i w_i``).
    """
    if lipschitz <= 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    sites = sorted(local_weights)
    if set(sites) != set(losses):
        raise ValueError(f"losses given for {sorted(losses)} but updates from {sites}")
    F = {s: max(float(losses[s]), EPS) for s in sites}
    float_keys = [k for k, v in global_weights.items() if np.issubdtype(np.asarray(v).dtype, np.floating)]
    norm_keys = [k for k in float_keys if is_trainable_key(k)]
    sq_norm = {s: sum(float(np.sum((lipschitz * (np.asarray(global_weights[k], np.float64)
                                                  - np.asarray(local_weights[s][k], np.float64))) ** 2))
                      for k in norm_keys) for s in sites}
    h = {s: q * F[s] ** (q - 1) * sq_norm[s] + lipschitz * F[s] ** q for s in sites}
    h_total = float(sum(h.values()))
    coef = {s: lipschitz * F[s] ** q / h_total for s in sites}
    out: Dict[str, np.ndarray] = {}
    for key, value in global_weights.items():
        w = np.asarray(value)
        if key in float_keys:
            step = sum(coef[s] * (w.astype(np.float64) - np.asarray(local_weights[s][key], np.float64)) for s in sites)
            out[key] = (w.astype(np.float64) - step).astype(w.dtype)
        else:
            out[key] = np.rint(np.mean([np.asarray(local_weights[s][key], np.float64) for s in sites], axis=0)
                               ).astype(w.dtype)
    return out, coef


# ---------------------------------------------------------------------------------------------------------- AFL
def project_simplex(v: Sequence[float], total: float = 1.0) -> np.ndarray:
    """Euclidean projection of ``v`` onto ``{x >= 0, sum x = total}`` (sort-based algorithm)."""
    v = np.asarray(v, dtype=np.float64)
    if total <= 0:
        raise ValueError("total must be positive")
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    idx = np.arange(1, len(v) + 1)
    rho = np.nonzero(u - css / idx > 0)[0][-1]
    theta = css[rho] / (rho + 1.0)
    return np.maximum(v - theta, 0.0)


def afl_step(losses: Mapping[str, float], prev: Optional[Mapping[str, float]] = None,
             lambda_lr: float = 0.1) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Agnostic FL (Mohri et al., ICML'19): mixture weights by projected gradient ascent on the losses.

    The global model of this round averages the local models with the current mixture ``lam`` (uniform at the
    start); then ``lam <- Proj(lam + lambda_lr * F)`` with ``F_i`` the loss of the received global model at site i.
    Absent sites keep their ``lam``; the present sites' entries are projected onto the simplex scaled to the mass
    they held, so the full vector keeps summing to 1. A new site enters with ``1/n`` (n = sites known), after
    which the full vector is renormalised.

    Returns:
        (weights used for this round's average, the updated mixture state).
    """
    present = sorted(losses)
    state = dict(prev or {})
    new = [s for s in present if s not in state]
    if new:
        n_known = len(set(state) | set(present))
        for s in new:
            state[s] = 1.0 / n_known
        state = normalize(state)
    used = normalize({s: state[s] for s in present}, fallback={s: 1.0 for s in present})
    mass = float(sum(state[s] for s in present))
    if mass <= 0:  # every present site had been driven to 0: give them back an equal share of a small mass
        mass = 1e-3
    ascended = [state[s] + lambda_lr * float(losses[s]) for s in present]
    projected = project_simplex(ascended, total=mass)
    updated = merge_state(state, dict(zip(present, projected)))
    return used, normalize(updated)


# ------------------------------------------------------------------------------------------------------- FairFed
def fairfed_weights(bacc: Mapping[str, float], n_samples: Mapping[str, float],
                    prev: Optional[Mapping[str, float]] = None, beta: float = 1.0) -> Dict[str, float]:
    """FairFed (Ezzeldin et al., AAAI'23) with accuracy as the fairness metric (the paper's form).

    First round (``prev`` None): ``a_i = n_i / sum n``. Afterwards: ``mean = sum n_i acc_i / sum n``,
    ``D_i = |acc_i - mean|``, ``a_i <- a_i - beta (D_i - mean_j D_j)``, clipped at 0 and renormalised (uniform if all
    are clipped). ``acc_i`` is the balanced accuracy of the received global model at site i. FFL4MIA's code takes
    ``mean`` element-wise (``acc_i n_i / N``), which the reference marks as a bug; this is the scalar version.
    A new site's previous weight is ``n_i / sum n``.
    """
    sites = sorted(bacc)
    init = normalize({s: float(n_samples[s]) for s in sites})
    if not prev:
        return init
    a_prev = _previous_for(sites, prev, init)
    n_total = float(sum(n_samples[s] for s in sites))
    mean_acc = sum(float(n_samples[s]) * float(bacc[s]) for s in sites) / n_total
    delta = {s: abs(float(bacc[s]) - mean_acc) for s in sites}
    mean_delta = float(np.mean(list(delta.values())))
    a = {s: max(a_prev[s] - beta * (delta[s] - mean_delta), 0.0) for s in sites}
    return normalize(a)


# --------------------------------------------------------------------------------------------------------- FedGA
def fedga_step_size(round_num: int, num_rounds: int, n_sites: int, step: float = 0.05) -> float:
    """FFL4MIA's decayed step ``step * (R - t) / R / N``."""
    return step * max(num_rounds - round_num, 0) / max(num_rounds, 1) / max(n_sites, 1)


def fedga_weights(gaps: Mapping[str, float], prev: Optional[Mapping[str, float]], round_num: int,
                  num_rounds: int, step: float = 0.05, present: Optional[Iterable[str]] = None) -> Dict[str, float]:
    """FedGA generalisation adjustment (FFL4MIA rule).

    ``gaps[i] = F_i(w_global) - F_i(w_i)``: the loss of the aggregated model minus the loss of the site's own
    local model of the same round, on its training set. ``GA = gaps - mean(gaps)``;
    ``a <- a + d * GA / max|GA|`` with ``d = fedga_step_size(round_num, num_rounds, n)``; clip at 0; renormalise.
    ``round_num`` is the round in which the evaluated aggregation happened.

    ``present`` (default: the sites in ``gaps``) are the sites aggregated now; a present site without a gap (it
    missed the previous round) keeps its previous weight, a new site starts from ``1/n``. With ``prev`` None
    (first round) the weights are uniform.
    """
    present = sorted(set(present) if present is not None else set(gaps))
    if not present:
        raise ValueError("no sites to weight")
    uniform = {s: 1.0 for s in present}
    if not prev:
        return normalize(uniform)
    a = _previous_for(present, prev, uniform)
    reporting = [s for s in present if s in gaps]
    if not reporting:
        return a
    ga = np.array([float(gaps[s]) for s in reporting])
    ga = ga - ga.mean()
    top = float(np.max(np.abs(ga)))
    if top <= 0:
        return a
    d = fedga_step_size(round_num, num_rounds, len(present), step)
    adjusted = dict(a)
    for s, g in zip(reporting, ga):
        adjusted[s] = max(a[s] + d * g / top, 0.0)
    return normalize(adjusted, fallback=uniform)


# --------------------------------------------------------------------------------------------------------- FedCE
def _flat(weights: Weights, keys: Sequence[str]) -> np.ndarray:
    return np.concatenate([np.asarray(weights[k], np.float64).ravel() for k in keys]) if keys else np.zeros(0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def fedce_cosines(updates: Mapping[str, Weights], coef: Mapping[str, float], keys: Sequence[str]) -> Dict[str, float]:
    """``cos(u_i, U - c_i u_i)`` with ``U = sum_j c_j u_j``: agreement of each update with the others' consensus."""
    flat = {s: _flat(u, keys) for s, u in updates.items()}
    consensus = sum(coef[s] * flat[s] for s in flat)
    return {s: cosine(flat[s], consensus - coef[s] * flat[s]) for s in flat}


def fedce_coefficients(cos_mean: Mapping[str, float], minus_mean: Mapping[str, float],
                       mode: str = "times") -> Dict[str, float]:
    """FedCE contribution estimate: ``G_i = 1 - mean cos_i`` (gradient space), ``M_i = 1 - mean m_i`` (data space,
    ``m_i`` = score of the minus model), each normalised to sum 1, combined by product (``times``, FFL4MIA) or sum
    (``plus``, NVFlare), normalised again. A zero vector normalises to uniform."""
    if mode not in ("times", "plus"):
        raise ValueError(f"mode must be 'times' or 'plus', got {mode!r}")
    sites = sorted(cos_mean)
    g = normalize({s: max(1.0 - float(cos_mean[s]), 0.0) for s in sites})
    m = normalize({s: max(1.0 - float(minus_mean[s]), 0.0) for s in sites})
    combined = {s: g[s] * m[s] if mode == "times" else g[s] + m[s] for s in sites}
    return normalize(combined)


def running_mean(history: Optional[Mapping[str, List[float]]], site: str, value: float) -> Tuple[List[float], float]:
    values = list((history or {}).get(site, [])) + [float(value)]
    return values, float(np.mean(values))


def fedce_step(updates: Mapping[str, Weights], minus_scores: Mapping[str, Optional[float]],
               state: Optional[Mapping[str, object]], keys: Sequence[str], mode: str = "times"
               ) -> Tuple[Dict[str, float], Dict[str, object]]:
    """One FedCE round (FFL4MIA variant): returns this round's aggregation weights and the new state.

    ``updates[i] = w_i - w_global`` (only ``keys``, the trainable entries, are used for the cosines). State:
    ``coef`` (last weights, used for the consensus; uniform at first), ``cos`` and ``minus`` (per-site histories),
    ``ctilde`` (history of per-round estimates, whose mean is the weight). A missing minus-model score (no previous
    local model yet, e.g. the first round) counts as 0, as FFL4MIA's ``m^0 = 0``. Absent sites keep their histories.
    """
    state = dict(state or {})
    present = sorted(updates)
    coef_prev = _previous_for(present, state.get("coef"), {s: 1.0 for s in present})
    cos_now = fedce_cosines(updates, coef_prev, keys)
    cos_hist = {k: list(v) for k, v in dict(state.get("cos") or {}).items()}
    minus_hist = {k: list(v) for k, v in dict(state.get("minus") or {}).items()}
    ct_hist = {k: list(v) for k, v in dict(state.get("ctilde") or {}).items()}
    cos_mean, minus_mean = {}, {}
    for s in present:
        cos_hist[s], cos_mean[s] = running_mean(cos_hist, s, cos_now[s])
        score = minus_scores.get(s)
        minus_hist[s], minus_mean[s] = running_mean(minus_hist, s, 0.0 if score is None else float(score))
    ctilde = fedce_coefficients(cos_mean, minus_mean, mode)
    weights = {}
    for s in present:
        ct_hist[s], weights[s] = running_mean(ct_hist, s, ctilde[s])
    weights = normalize(weights)
    new_state = {"coef": merge_state(state.get("coef"), weights), "cos": cos_hist, "minus": minus_hist,
                 "ctilde": ct_hist, "last_cos": cos_now}
    return weights, new_state


def minus_model(global_weights: Weights, prev_local: Weights, coef: float) -> Dict[str, np.ndarray]:
    """FedCE minus model ``(w - c_i w_i) / (1 - c_i)``: the global model without site i's contribution.

    Only floating-point entries change; integer counters are taken from the global model; BatchNorm running
    variances are kept positive.
    """
    if not 0.0 <= coef < 1.0:
        raise ValueError(f"the minus model needs 0 <= c_i < 1, got {coef}")
    out = {}
    for k, v in global_weights.items():
        w = np.asarray(v)
        if np.issubdtype(w.dtype, np.floating):
            m = (w.astype(np.float64) - coef * np.asarray(prev_local[k], np.float64)) / (1.0 - coef)
            if k.endswith("running_var"):
                m = np.maximum(m, 1e-5)
            out[k] = m.astype(w.dtype)
        else:
            out[k] = w.copy()
    return out


def is_trainable_key(name: str) -> bool:
    """State-dict entries that are parameters (not BatchNorm statistics or counters)."""
    return not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
