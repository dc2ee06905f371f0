"""The personalisation report: derived references, paired figures against local and FedAvg, the goal check."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import personal_report as pr  # noqa: E402

SITES = ["site-1", "site-2"]


def _record(label, seed, final, finetune=None, global_final=None, method="fedavg"):
    """A run whose last round scores ``final`` per site (first round: all 0.1)."""
    start = {s: 0.1 for s in SITES}
    last = {"round": 1, "val": dict(final), "test": dict(final)}
    first = {"round": 0, "val": start, "test": start}
    if global_final is not None:
        last.update(global_val=dict(global_final), global_test=dict(global_final))
        first.update(global_val=start, global_test=start)
    record = {"label": f"{label} s{seed}", "sites": SITES, "rounds": [first, last],
              "config": {"seed": seed, "method": method, "finetune_epochs": 2 if finetune else 0,
                         "synthetic": {"variant": "anatomy", "modalities": ["t1", "t2"]}}}
    if finetune:
        record["finetune"] = {split: {s: [0.0, v] for s, v in finetune.items()} for split in ("val", "test")}
    return record


def _runs(offsets):
    """Records of four methods over three seeds; ``offsets[method]`` shifts every site's Dice."""
    records = []
    for seed, noise in zip((20, 21, 22), (0.0, 0.01, -0.01)):
        base = {"site-1": 0.60 + noise, "site-2": 0.70 - noise}
        shift = lambda m, d=base: {s: v + offsets[m][i] for i, (s, v) in enumerate(d.items())}  # noqa: E731
        records.append(_record("local", seed, shift("local"), method="local"))
        records.append(_record("fedavg", seed, shift("fedavg"), finetune=shift("ft")))
        records.append(_record("ditto", seed, shift("ditto"), global_final=shift("fedavg"), method="ditto"))
    return records


def test_references_are_derived_from_the_records():
    records = _runs({"local": (0, 0), "fedavg": (-0.2, -0.1), "ft": (0.05, 0.04), "ditto": (0.02, -0.01)})
    labels = [r["label"] for r in pr.derived_records(records)]
    assert "fedavg + fine-tune s20" in labels and "ditto (global) s21" in labels
    ft = next(r for r in pr.derived_records(records) if r["label"] == "fedavg + fine-tune s20")
    assert ft["rounds"][-1]["test"] == {"site-1": 0.65, "site-2": 0.74}
    assert all(pr.is_personal_record(r) for r in records if not r["label"].startswith("local"))


def test_goal_needs_every_site_above_local_and_a_global_part_as_good_as_fedavg():
    records = _runs({"local": (0, 0), "fedavg": (-0.2, -0.1), "ft": (0.05, 0.04), "ditto": (0.02, -0.01)})
    text = pr.report(records)
    goal = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.endswith("|")
            and ("met" in line)}
    # ditto: site-2 falls below its local model, so the goal is not met, though its global part equals FedAvg's
    assert "no (site-1 +0.020, site-2 -0.010" in goal["ditto"] and goal["ditto"].endswith("| not met |")
    assert "ditto (global) |" in text and "+0.000 [+0.000, +0.000]" in text
    assert "| fedavg + fine-tune | 20,21,22 | 0.695 ± 0.000 | 0.650 ± 0.010 | +0.045 [+0.045, +0.045] *" in text

    better = _runs({"local": (0, 0), "fedavg": (-0.2, -0.1), "ft": (0.05, 0.04), "ditto": (0.03, 0.02)})
    line = next(x for x in pr.report(better).splitlines() if x.startswith("| ditto | yes"))
    assert line.endswith("| yes | **met** |")
