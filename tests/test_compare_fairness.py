"""The fairness comparison runner's scoring: test-split figures and pairing with FedAvg by seed."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import compare_fairness  # noqa: E402


def _record(method, seed, final, last5, corrupted=0.5):
    return {"method": method, "seed": seed, "seconds": 10.0,
            "summary_rounds": [{"round": 0, "sites": {}, "global_test": {"clean_bacc": 0.9, "corrupted_bacc": corrupted,
                                                                        "clean_corrupted_gap": 0.9 - corrupted}}],
            "held_out": {"matrix": {"global": final}, "last5": {"mean": last5, "worst": last5 - 0.1}}}


def test_scores_use_the_final_models_test_figures():
    s = compare_fairness.scores(_record("fedism", 0, {"a": 0.9, "b": 0.5}, 0.7), last=3)
    assert s["bacc_mean"] == pytest.approx(0.7) and s["bacc_worst"] == 0.5 and s["bacc_gap"] == pytest.approx(0.4)
    assert s["last5_mean"] == 0.7 and s["test_corrupted"] == 0.5


def test_aggregate_pairs_methods_with_fedavg_by_seed(tmp_path):
    records = [_record("fedavg_cls", k, {"a": 0.9, "b": 0.4 + 0.01 * k}, 0.6) for k in range(5)] + \
        [_record("fedism", k, {"a": 0.88, "b": 0.5 + 0.01 * k + 0.002 * (k % 2)}, 0.6) for k in range(5)]
    rows = compare_fairness.aggregate(records, ["fedavg_cls", "fedism"], last=3)
    worst = rows[1]["vs_bacc_worst"]
    assert worst["diff"] == pytest.approx(0.1008) and worst["significant"] == 1.0
    assert "vs_bacc_worst" not in rows[0]
    table = compare_fairness.write_tables(rows, str(tmp_path), "cmd")
    assert "| fedism | 5 |" in table and "*" in table


def test_a_finished_run_is_reused_only_with_the_same_rounds_and_benchmark(tmp_path):
    import json

    synthetic = {"n_train": 128, "n_val": 64, "n_test": 128, "qualities": ["hq", "hq", "hq", "lowres"]}
    run_dir = compare_fairness.run_dir_of(str(tmp_path), "fedism", 3)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "record.json"), "w") as f:
        json.dump({**_record("fedism", 3, {"a": 0.9}, 0.9), "rounds_budget": 20, "synthetic": synthetic}, f)
    out = str(tmp_path)
    assert compare_fairness.run_one("fedism", 3, 20, synthetic, 4, 4, out)["skipped"]
    assert compare_fairness.prepare_run("fedism", 3, 20, synthetic, 4, out) is None
    # other rounds or another benchmark: the job is written afresh to run again, not the old record reused
    for rounds, settings in ((12, synthetic), (20, {**synthetic, "qualities": ["hq", "blur", "noisy", "lowres"]})):
        assert compare_fairness.finished_record("fedism", 3, rounds, settings, out) is None
        job = compare_fairness.prepare_run("fedism", 3, rounds, settings, 4, out)
        assert job is not None and os.path.isfile(os.path.join(job, "meta.json"))
