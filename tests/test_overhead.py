"""The overhead benchmark's arithmetic: runner specs, the line fit and the table (no runs)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import overhead  # noqa: E402
from overhead import Measurement  # noqa: E402


def test_runner_specs_give_sites_and_workers():
    assert overhead.parse_runner("fedavg") == ("fedavg", 3, 3)
    assert overhead.parse_runner("fedism") == ("fedism", 4, 4)
    assert overhead.parse_runner("fedavg_cls@100/2") == ("fedavg_cls", 100, 2)
    assert overhead.parse_runner("fedavg_cls@10") == ("fedavg_cls", 10, 10)


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
    assert "| fedavg | 26.0 | 2.00 | +18.0 | +1.00 | 42.0 | 950 |" in table
    assert "fedda / fedavg per round: 1.50x" in table
