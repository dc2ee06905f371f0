"""The comparison runner on a tiny sweep: runs, resumes, writes tables and plots."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import compare  # noqa: E402


def test_parse_method_variants():
    assert compare.parse_method("fedda") == ("fedda", {})
    assert compare.parse_method("fedda:adv_weight=0.1,warmup_rounds=0") == (
        "fedda", {"adv_weight": 0.1, "warmup_rounds": 0})
    with pytest.raises(ValueError):
        compare.parse_method("fedda:adv_weight")


def _rounds(values):
    """Per-round records: (validation, test) Dice of both sites for each round."""
    return [{"round": r, "val": {"site-1": v, "site-2": v}, "test": {"site-1": t, "site-2": t}}
            for r, (v, t) in enumerate(values)]


def test_scores_of_a_federated_and_a_local_record():
    sites = ["site-1", "site-2"]
    mods = {"site-1": "t1", "site-2": "ct"}
    fed = {"method": "fedavg", "sites": sites, "modalities": mods, "probe_accuracy": 0.5,
           "rounds": _rounds([(0.1, 0.1), (0.5, 0.4), (0.9, 0.6), (0.6, 0.7), (0.7, 0.7), (0.8, 0.72)]),
           "matrix": {"global": {"site-1": 0.8, "site-2": 0.6}, "best_global": {"site-1": 0.7, "site-2": 0.7},
                      "site-1": {"site-1": 0.9, "site-2": 0.1}, "site-2": {"site-1": 0.3, "site-2": 0.7}}}
    s = compare.scores(fed)
    assert s["dice_t1"] == 0.8 and s["dice_ct"] == 0.6 and s["worst"] == 0.6
    assert s["mean"] == pytest.approx(0.7)
    assert s["in_site"] == pytest.approx(0.8) and s["cross_site"] == pytest.approx(0.2)
    assert s["best_mean"] == pytest.approx(0.7) and s["best_worst"] == pytest.approx(0.7)
    # the last five models: received in rounds 2..5, then the final one (the cross-site row)
    assert s["last5_mean"] == pytest.approx((0.6 + 0.7 + 0.7 + 0.72 + 0.7) / 5)
    assert s["swing"] == pytest.approx(0.1) and s["probe"] == 0.5
    local = {"method": "local", "sites": sites, "modalities": mods, "rounds": _rounds([(0.5, 0.5)]),
             "matrix": {k: fed["matrix"][k] for k in sites}}
    assert compare.scores(local)["mean"] == pytest.approx(0.8)  # each site's own model on its own data
    pooled = {"method": "pooled", "sites": sites, "modalities": mods,
              "rounds": _rounds([(0.4, 0.3), (0.9, 0.5), (0.6, 0.9)]),
              "matrix": {"pooled": {"site-1": 0.5, "site-2": 0.9}}}
    scored = compare.scores(pooled)
    assert "in_site" not in scored and scored["worst"] == 0.5
    assert scored["best_mean"] == pytest.approx(0.5)  # chosen on validation (round 1), reported on test


def test_aggregate_pairs_seeds_with_fedavg():
    def record(method, seed, dice):
        return {"method": method, "seed": seed, "sites": ["site-1"], "modalities": {"site-1": "t1"},
                "rounds": _rounds([(dice, dice), (dice, dice)]), "matrix": {"global": {"site-1": dice}}}

    records = [record("fedavg", s, 0.5 + 0.01 * s) for s in range(5)] + \
        [record("fedda", s, 0.6 + 0.01 * s + 0.001 * (s % 2)) for s in range(5)]
    rows = compare.aggregate(records, ["fedavg", "fedda"])
    diff = rows[1]["vs_fedavg_mean"]
    assert diff["diff"] == pytest.approx(0.1004) and diff["n"] == 5 and diff["significant"] == 1.0
    assert "vs_fedavg_mean" not in rows[0]


@pytest.mark.slow
def test_tiny_sweep_runs_resumes_and_reports(tmp_path):
    out = str(tmp_path / "sweep")
    synthetic = {"modalities": ["t1", "ct"], "n_train": 12, "n_val": 4, "n_test": 4}
    lines = []
    records = compare.sweep(["local", "pooled", "fedavg"], [0], 1, synthetic, out, log=lines.append)
    assert [r["method"] for r in records] == ["local", "pooled", "fedavg"]
    for name in ("results.md", "results.csv", "curves.png", "cross_site.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    table = open(os.path.join(out, "results.md")).read()
    for method in ("local", "pooled", "fedavg"):
        assert f"| {method} | 1 |" in table
    assert "| method | ct | t1 |" in table and "cross_site" in table and "last5_mean" in table
    fed = records[2]
    assert {"global", "site-1", "site-2"} <= set(fed["matrix"])  # no best model after a single round
    assert all(0.0 <= v <= 1.0 for row in fed["matrix"].values() for v in row.values())
    again = []
    compare.sweep(["local", "pooled", "fedavg"], [0], 1, synthetic, out, log=again.append)
    assert sum("already done" in line for line in again) == 3
    os.remove(os.path.join(out, "results.md"))
    reported = compare.sweep(["local", "pooled", "fedavg", "fedprox"], [0, 1], 1, synthetic, out, log=again.append,
                             report_only=True)
    assert [r["method"] for r in reported] == ["local", "pooled", "fedavg"]  # nothing ran for the missing ones
    assert "| fedavg | 1 |" in open(os.path.join(out, "results.md")).read()
