"""The overhead benchmark's arithmetic: runner specs, the line fit and the table (no runs)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import overhead  # noqa: E402
from overhead import Measurement  # noqa: E402


def test_runner_specs_give_sites_and_workers():
    assert overhead.parse_runner("fedavg") == ("fedavg", 3, 3, {}, {})
    assert overhead.parse_runner("fedism") == ("fedism", 4, 4, {}, {})
    assert overhead.parse_runner("fedavg_cls@100/2") == ("fedavg_cls", 100, 2, {}, {})
    assert overhead.parse_runner("fedavg_cls@10") == ("fedavg_cls", 10, 10, {}, {})
    assert overhead.parse_runner("fedavg:evaluate_local_model=false,ctl.memory_gc_rounds=1") == (
        "fedavg", 3, 3, {"evaluate_local_model": False}, {"memory_gc_rounds": 1})


def test_memory_per_round_from_the_server_log(tmp_path):
    log = tmp_path / "run.log"
    log.write_text("".join(f"2026-01-01 00:00:{10 + 2 * r:02d},500 - INFO - Round {r} started.\n" for r in range(12))
                   + "2026-01-01 00:00:40,000 - INFO - Round 11 finished.\n")
    starts = overhead.round_start_times(str(log))
    assert len(starts) == 12 and starts[1] - starts[0] == pytest.approx(2.0)
    samples = [(starts[0] - 5 + 0.5 * k, 100.0 + 0.5 * k) for k in range(60)]  # PSS grows 1 MiB per second
    per_round = overhead.pss_at(samples, starts)
    assert len(per_round) == 12 and per_round[1] - per_round[0] == pytest.approx(2.0)
    assert overhead.growth_per_round(per_round) == pytest.approx(2.0)  # 2 s per round
    assert overhead.growth_per_round(per_round[:8]) is None


def test_line_fit_recovers_fixed_cost_and_cost_per_round():
    points = [Measurement("x", r, 5.0 + 1.5 * r, 0.0) for r in (2, 8, 8)]
    fixed, per_round = overhead.line_fit(points)
    assert fixed == pytest.approx(5.0)
    assert per_round == pytest.approx(1.5)


def test_table_gives_excess_over_the_floor_and_method_cost():
    results = [Measurement("bare", 2, 10.0, 400), Measurement("bare", 8, 16.0, 420),
               Measurement("fedavg", 2, 30.0, 900), Measurement("fedavg", 8, 42.0, 950),
               Measurement("fedda", 2, 33.0, 1000), Measurement("fedda", 8, 51.0, 1100)]
    table = overhead.summarise(results)
    assert "| fedavg | 26.0 | 2.00 | +18.0 | +1.00 | – | 42.0 | 950 | – |" in table
    assert "fedda / fedavg per round: 1.50x" in table
    repeated = results + [Measurement("fedavg", 2, 31.0, 900, repeat=1), Measurement("fedavg", 8, 49.0, 950, repeat=1)]
    assert "| fedavg | 25.5 | 2.50 (2.00-3.00) | +17.5 | +1.50 | – | 45.5 |" in overhead.summarise(repeated)
    single = overhead.summarise([Measurement("fedavg_cls@20/2", 1, 120.0, 3000)])
    assert "| fedavg_cls@20/2 | – | – | – | – | – | 120.0 | 3000 | – |" in single
    timed = [Measurement("fedavg", 8, 40.0, 900, round_seconds=[9.0, 2.0, 2.5, 2.2, 30.0])]
    assert overhead.median_round(timed) == pytest.approx(2.35)  # the first round and one slow round do not count
