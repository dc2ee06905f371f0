"""Checks of the numbers a site reports (pure functions; no FLARE).

Everything the server computes from a site's result besides the weights themselves (the sample count, the
statistics the fairness rules read, the metrics used for model selection and the run summary) passes through these
functions first. A value that the server *uses to weight sites* and is not a finite number of the right type inside
its documented range makes the site's update invalid (:class:`ReportError`, naming the site and the key). Other
reported metrics that are out of range are dropped from the record with a note naming the site and key, and the
update itself still counts (:func:`clean_metrics`).

Ranges (see :data:`STATISTIC_BOUNDS`): losses and the FedISM sharpness lie in ``[0, MAX_LOSS]``; balanced
accuracies, Dice scores, accuracies and AUCs in ``[0, 1]``; counts and rounds are non-negative integers.

Sample counts (FedAvg weights) cannot buy weight: :func:`effective_sample_counts` either uses the counts the server
was told for each site (``declared``) or caps each reported count at ``max_sample_ratio`` times the median count of
the round (default :data:`DEFAULT_MAX_SAMPLE_RATIO`).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..keys import BACC_GLOBAL_TRAIN, FEDCE_MINUS_SCORE, LOSS_GLOBAL, LOSS_PREV_LOCAL, PREV_LOCAL_ROUND, SHARPNESS

MAX_LOSS = 1e3
"""Largest loss (and sharpness, a loss difference) a site may report. A mean cross-entropy of 1000 would need
logits of that size: no trained or freshly initialised network reaches it, while 1e30 (which took all of FedISM's
weight) and 1e200 (which overflowed q-FedAvg) are refused."""

MAX_SAMPLES = 10 ** 9
"""Largest sample count accepted at all (larger is refused as invalid, not capped)."""

DEFAULT_MAX_SAMPLE_RATIO = 10.0
"""Default cap of a reported sample count, as a multiple of the round's median count (see
:func:`effective_sample_counts`)."""

MAX_TEXT = 200
"""Longest text value (e.g. ``modality``) a report may carry."""


class UpdateError(ValueError):
    """A site's update cannot be aggregated (its weights or its report); the message names the site and the
    parameter or key."""


class ReportError(UpdateError):
    """A value a site reported cannot be used; the message names the site and the key."""


@dataclass(frozen=True)
class Bound:
    """Accepted values of one reported number: ``low <= value <= high``, an integer if ``integer``."""

    low: float
    high: float
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in [{self.low:g}, {self.high:g}]"


UNIT = Bound(0.0, 1.0)
LOSS = Bound(0.0, MAX_LOSS)
COUNT = Bound(0, MAX_SAMPLES, integer=True)

STATISTIC_BOUNDS: Dict[str, Bound] = {
    LOSS_GLOBAL: LOSS,
    LOSS_PREV_LOCAL: LOSS,
    SHARPNESS: LOSS,
    BACC_GLOBAL_TRAIN: UNIT,
    FEDCE_MINUS_SCORE: UNIT,
    PREV_LOCAL_ROUND: Bound(-10 ** 6, 10 ** 6, integer=True),  # only compared with the current round
}
"""The statistics the fairness rules weight sites by, and their ranges."""

_UNIT_NAME = re.compile(r"^(test_)?([a-z0-9]+_)?(dice|bacc|acc|auc|domain_acc|disc_acc)(_.+)?$")
_COUNT_NAME = re.compile(r"^n_[a-z_]+$")
_LOSS_NAME = re.compile(r"^(train_)?(loss|seg|prox|adv|disc|head)(_.+)?$|^loss(_.+)?$")


def bound_for(key: str) -> Optional[Bound]:
    """The range of a reported metric, from its name (``None``: any finite number)."""
    if key in STATISTIC_BOUNDS:
        return STATISTIC_BOUNDS[key]
    if _COUNT_NAME.match(key):
        return COUNT
    if _UNIT_NAME.match(key):
        return UNIT
    if _LOSS_NAME.match(key):
        return Bound(-MAX_LOSS, MAX_LOSS)  # training terms (e.g. an adversarial loss) may be negative
    return None


def is_number(value: Any) -> bool:
    """A real number that is not a bool (numpy scalars included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_number(site: str, key: str, value: Any, bound: Optional[Bound] = None) -> float:
    """``value`` as a float if it is a finite number inside ``bound``; else :class:`ReportError` naming both."""
    if not is_number(value):
        raise ReportError(f"site '{site}' reported '{key}' = {value!r} ({type(value).__name__}), expected a number")
    number = float(value)
    if not math.isfinite(number):
        raise ReportError(f"site '{site}' reported a non-finite '{key}' = {value!r}")
    if bound is not None:
        if bound.integer and not number.is_integer():
            raise ReportError(f"site '{site}' reported '{key}' = {value!r}, expected {bound.describe()}")
        if not bound.low <= number <= bound.high:
            raise ReportError(f"site '{site}' reported '{key}' = {value!r}, outside its range: expected "
                              f"{bound.describe()}")
    return number


def check_statistics(site: str, report: Any, keys: Optional[List[str]] = None) -> Dict[str, float]:
    """Validate the weighting statistics in a site's report (all of :data:`STATISTIC_BOUNDS` that are present, or
    only ``keys``); returns them as floats. Absent statistics are not an error here (the rule that needs one says
    so)."""
    if report is None:
        return {}
    if not isinstance(report, Mapping):
        raise ReportError(f"site '{site}' sent a report of type {type(report).__name__}, expected a mapping")
    out = {}
    for key in keys or list(STATISTIC_BOUNDS):
        if report.get(key) is not None:
            out[key] = check_number(site, key, report[key], STATISTIC_BOUNDS[key])
    return out


def check_sample_count(site: str, value: Any) -> int:
    """The training sample count of a site: a positive integer up to :data:`MAX_SAMPLES`."""
    if value is None:
        raise ReportError(f"site '{site}' did not report its number of training samples")
    n = check_number(site, "number of training samples", value, COUNT)
    if n < 1:
        raise ReportError(f"site '{site}' reported {value!r} training samples, expected at least 1")
    return int(n)


def clean_metrics(site: str, metrics: Any) -> Tuple[Dict[str, Any], List[str]]:
    """The reported metrics that can be recorded, and a note per value dropped (naming the site and the key).

    Numbers must be finite and inside the range their name implies (:func:`bound_for`); short strings are kept;
    anything else (nested objects, bools, long text) is dropped.
    """
    if metrics is None:
        return {}, []
    if not isinstance(metrics, Mapping):
        return {}, [f"site '{site}' sent metrics of type {type(metrics).__name__}; none recorded"]
    kept: Dict[str, Any] = {}
    notes: List[str] = []
    for key, value in metrics.items():
        if not isinstance(key, str):
            notes.append(f"site '{site}': metric name {key!r} is not a string; dropped")
        elif isinstance(value, str) and len(value) <= MAX_TEXT:
            kept[key] = value
        else:
            try:
                number = check_number(site, key, value, bound_for(key))
            except ReportError as e:
                notes.append(f"{e}; dropped from the record")
                continue
            kept[key] = int(number) if isinstance(value, numbers.Integral) else number
    return kept, notes


def clean_cross_site(results: Mapping[str, Mapping[str, Any]]) -> Tuple[Dict[str, Dict[str, Any]], List[str]]:
    """Cross-site evaluation results ``results[data_site][model] = metrics`` with every metric checked by
    :func:`clean_metrics` (the reporting site is ``data_site``); returns the cleaned results and the notes."""
    cleaned: Dict[str, Dict[str, Any]] = {}
    notes: List[str] = []
    for data_site, by_model in results.items():
        for model, metrics in (by_model or {}).items():
            kept, dropped = clean_metrics(str(data_site), metrics)
            cleaned.setdefault(data_site, {})[model] = kept
            notes += [f"{n} (cross-site evaluation of model '{model}')" for n in dropped]
    return cleaned, notes


def effective_sample_counts(reported: Mapping[str, int], declared: Optional[Mapping[str, int]] = None,
                            max_sample_ratio: Optional[float] = DEFAULT_MAX_SAMPLE_RATIO
                            ) -> Tuple[Dict[str, float], List[str]]:
    """The sample counts the server weights sites by, and a note per count it changed.

    ``declared`` (``{site: count}``, set on the server): a site's count is ``min(reported, declared)``: a site can
    lower its weight for a round, never raise it; a site without a declaration raises :class:`ReportError`.

    Without ``declared``: each count is capped at ``max_sample_ratio`` times the round's lower median (the
    ``ceil(n/2)``-th smallest count), so that one site cannot outweigh the others by claiming more samples; with
    three or more sites one liar cannot move the median. ``None`` turns the cap off. Honest federations whose sites
    differ less than the ratio keep their counts exactly.
    """
    notes: List[str] = []
    if declared is not None:
        out = {}
        for site, n in reported.items():
            if site not in declared:
                raise ReportError(f"site '{site}' has no declared sample count on the server (site_samples)")
            out[site] = float(min(n, declared[site]))
            if n > declared[site]:
                notes.append(f"site '{site}' reported {n} training samples, more than the {declared[site]} "
                             f"declared for it; weighting it by {declared[site]}")
        return out, notes
    out = {site: float(n) for site, n in reported.items()}
    if max_sample_ratio is None or not out:
        return out, notes
    counts = sorted(out.values())
    cap = max_sample_ratio * counts[(len(counts) - 1) // 2]
    for site, n in reported.items():
        if n > cap:
            out[site] = cap
            notes.append(f"site '{site}' reported {n} training samples, more than {max_sample_ratio:g} x the "
                         f"round's median ({counts[(len(counts) - 1) // 2]:g}); weighting it by {cap:g}")
    return out, notes
