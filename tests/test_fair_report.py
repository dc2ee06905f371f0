"""The fairness tables (``benchmarks/fair_report.py``): clean and degraded sites apart, pairing by seed, the goal
check, and which split is shown."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import fair_report  # noqa: E402

QUALITIES = {"site-1": "hq", "site-2": "hq", "site-3": "lowres"}


def _record(method, seed, test, val=None, global_test=None):
    val = val or test
    return {"tag": "minority", "method": method, "seed": seed, "rounds": 2, "sites": list(QUALITIES),
            "history": [{"quality": QUALITIES, "test": test, "val": val, "weight": {}, "sharpness": {}}] * 2,
            "final": {s: {"test": test[s], "val": val[s]} for s in test}, "global_test": global_test,
            "seconds": 10.0}


def test_figures_split_clean_and_degraded_sites():
    r = _record("fedism", 0, {"site-1": 0.9, "site-2": 0.8, "site-3": 0.5}, global_test={"clean": 0.9,
                                                                                         "corrupted": 0.4})
    f = fair_report.figures(r, "test")
    assert f["clean"] == pytest.approx(0.85) and f["degraded"] == 0.5 and f["worst"] == 0.5
    assert f["mean"] == pytest.approx(2.2 / 3) and f["global corrupted"] == 0.4


def test_report_pairs_by_seed_and_checks_the_goal():
    records = []
    for k in range(4):
        records.append(_record("fedavg_cls", k, {"site-1": 0.95, "site-2": 0.93, "site-3": 0.40 + 0.01 * k}))
        records.append(_record("afl", k, {"site-1": 0.95, "site-2": 0.93, "site-3": 0.44 + 0.01 * k}))
        # FedISM: degraded +0.10 (+0.06 over AFL), clean sites -0.01 on average
        records.append(_record("fedism", k, {"site-1": 0.94, "site-2": 0.92, "site-3": 0.50 + 0.01 * k + 0.001 * (k % 2)}))
    text = fair_report.report(records, split="test")
    assert "| fedavg_cls | 0,1,2,3 |" in text and text.index("| fedavg_cls |") < text.index("| afl |")
    assert "+0.100 [" in text and "*" in text  # degraded-site difference, significant
    assert "site-3 (lowres)" in text
    goal = text[text.index("Goal check"):]
    assert "(goal ≥ +0.05): met" in goal and "best other baseline, afl (goal ≥ +0.03): met" in goal
    assert "within 0.02): met" in goal
    # validation tables show validation figures and no global test columns
    val = fair_report.report([_record("fedavg_cls", 0, {"site-1": 0.1, "site-2": 0.1, "site-3": 0.1},
                                      val={"site-1": 0.7, "site-2": 0.7, "site-3": 0.7})], split="val")
    assert "0.700" in val and "global clean" not in val


def test_goal_not_met_is_said():
    records = [_record("fedavg_cls", k, {"site-1": 0.95, "site-2": 0.95, "site-3": 0.40 + 0.01 * k}) for k in range(3)]
    records += [_record("fedism", k, {"site-1": 0.85, "site-2": 0.85, "site-3": 0.42 + 0.01 * k}) for k in range(3)]
    goal = fair_report.report(records)[fair_report.report(records).index("Goal check"):]
    assert "(goal ≥ +0.05): not met" in goal and "within 0.02): not met" in goal
