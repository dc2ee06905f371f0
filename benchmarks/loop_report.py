#!/usr/bin/env python3
"""Tables of in-process federated runs (``benchmarks/bare_loop.py --out``), regenerated from the committed records.

    python benchmarks/loop_report.py docs/results/anatomy/records.jsonl            # print the Markdown tables
    python benchmarks/loop_report.py docs/results/anatomy/records.jsonl --write docs/results/anatomy/tables.md
    python benchmarks/loop_report.py docs/results/anatomy/tuning.jsonl --split val  # a sweep, on validation
    python benchmarks/loop_report.py --docs      # rewrite every tables.md/tuning.md and the docs that quote them

(``--docs`` also rewrites the tables of the fairness records, ``benchmarks/fair_loop.py``, with
``benchmarks/fair_report.py``, and those of the personalisation comparison with ``benchmarks/personal_report.py``.)

``--docs`` regenerates, for every ``docs/results/<name>/records.jsonl`` (test split) and ``tuning.jsonl``
(validation split), the file ``tables.md`` / ``tuning.md`` beside it, and the blocks of ``docs/*.md`` between
``<!-- tables: results/<name> -->`` (or ``results/<name>/tuning``) and ``<!-- end of tables -->``.

Records are grouped by benchmark (variant, dimensions, sites) and by *method label* (``--label`` of the run, else its
settings without the seed). Every figure is on the **test** split; validation only chose the settings
(docs/training.md). Columns:

- ``mean`` / ``worst``: Dice (of the test split; ``--split val``: the validation split, for tuning sweeps) of the model
  each site deploys after the last round (the final global model; with
  site-local layers the global model with the site's own layers; local-only: the site's own model), averaged over
  sites / at the worst site; mean ± standard deviation over seeds.
- ``swing``: the largest change of the mean Dice between consecutive rounds among the last five;
  ``site swing``: the same for each site's own Dice, largest over sites (an alternation between sites shows here
  even when the mean stays level).
- ``probe``: held-out accuracy of a linear probe telling the sites apart from the final global model's pooled
  bottleneck features (chance 1/K); ``probe r0/r1/r5/r10``: the same for the global model of rounds 0 (the
  untrained, random network), 1, 5 and 10; ``raw-image probe``: the same probe on the images' 32-bin intensity
  histograms (how visible the site is before any network).
- ``Δ mean`` / ``Δ worst``: paired difference to the baseline method (default ``fedavg``), seed by seed, with its
  95% t interval; ``*`` where it excludes 0.

A per-site table gives each site's Dice and its paired difference to the baseline, so that a change of which site
is worst cannot hide a loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "custom"))

from paired_stats import paired_difference  # noqa: E402


def load_records(paths: Sequence[str]) -> List[Dict[str, Any]]:
    records = []
    for path in paths:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def benchmark_key(record: Dict[str, Any]) -> str:
    syn = record["config"]["synthetic"]
    sites = len(record["sites"])
    holdout = record["config"].get("holdout") or ""
    name = f"{syn.get('variant', 'blobs')} {syn.get('spatial_dims', 2)}D, {sites} sites"
    return name + (f", {holdout} left out" if holdout else "")


def method_label(record: Dict[str, Any]) -> str:
    label = record.get("label", "")
    return label.rsplit(" s", 1)[0] if label else record["config"]["method"]


def site_swing(record: Dict[str, Any], window: int = 5) -> float:
    """Largest round-to-round change of any site's Dice among the last ``window`` rounds."""
    rounds = record["rounds"][-window:]
    sites = record["sites"]
    return max(abs(b[SPLIT][s] - a[SPLIT][s]) for s in sites for a, b in zip(rounds, rounds[1:]))


def mean_swing(record: Dict[str, Any], window: int = 5) -> float:
    """Largest round-to-round change of the mean Dice among the last ``window`` rounds."""
    tail = curve(record)[-window:]
    return max(abs(b - a) for a, b in zip(tail, tail[1:]))


SPLIT = "test"  # the split the tables read (``--split``)


def final_sites(record: Dict[str, Any]) -> Dict[str, float]:
    return dict(record["rounds"][-1][SPLIT])


def curve(record: Dict[str, Any]) -> List[float]:
    return [float(np.mean(list(r[SPLIT].values()))) for r in record["rounds"]]


def probe_at(record: Dict[str, Any], rnd: int) -> Optional[float]:
    for entry in record["rounds"]:
        if entry["round"] == rnd and "probe" in entry:
            return entry["probe"]
    return None


def fmt(values: Sequence[Optional[float]]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def fmt_diff(d: Dict[str, float]) -> str:
    if d["n"] < 2:
        return f"{d['diff']:+.3f}"
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" + (" *" if d["significant"] else "")


def paired(runs: Dict[int, Dict[str, Any]], base: Dict[int, Dict[str, Any]], get) -> Optional[Dict[str, float]]:
    """The paired difference of ``get`` between two methods' runs over the seeds where both have a figure."""
    seeds = [s for s in sorted(set(runs) & set(base)) if get(runs[s]) is not None and get(base[s]) is not None]
    if not seeds:
        return None
    return paired_difference([get(runs[s]) for s in seeds], [get(base[s]) for s in seeds])


def group(records: List[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[int, Dict[str, Any]]]]:
    """``{benchmark: {method: {seed: record}}}`` in the order first seen (a rerun of a seed replaces it)."""
    out: Dict[str, Dict[str, Dict[int, Dict[str, Any]]]] = {}
    for r in records:
        out.setdefault(benchmark_key(r), {}).setdefault(method_label(r), {})[int(r["config"]["seed"])] = r
    return out


def main_table(methods: Dict[str, Dict[int, Dict[str, Any]]], baseline: str) -> List[str]:
    lines = ["| method | seeds | mean | worst | swing | site swing | probe | probe r0 / r1 / r5 / r10 | raw-image probe | "
             f"Δ mean vs {baseline} (95% CI) | Δ worst vs {baseline} (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = methods.get(baseline, {})
    for name, runs in methods.items():
        recs = [runs[s] for s in sorted(runs)]
        means = [float(np.mean(list(final_sites(r).values()))) for r in recs]
        worsts = [float(np.min(list(final_sites(r).values()))) for r in recs]
        swings = [mean_swing(r) for r in recs]
        probes = [r.get("probe_accuracy") for r in recs]
        early = " / ".join(fmt([probe_at(r, k) for r in recs]).split(" ± ")[0] for k in (0, 1, 5, 10))
        raw = fmt([r.get("raw_probe") for r in recs]).split(" ± ")[0]
        if name == baseline or not base:
            d_mean = d_worst = "–"
        else:
            dm = paired(runs, base, lambda r: float(np.mean(list(final_sites(r).values()))))
            dw = paired(runs, base, lambda r: float(np.min(list(final_sites(r).values()))))
            d_mean, d_worst = (fmt_diff(dm), fmt_diff(dw)) if dm else ("–", "–")
        lines.append(f"| {name} | {','.join(str(s) for s in sorted(runs))} | {fmt(means)} | {fmt(worsts)} | "
                     f"{fmt(swings)} | {fmt([site_swing(r) for r in recs])} | {fmt(probes)} | {early} | {raw} | "
                     f"{d_mean} | {d_worst} |")
    return lines


def site_table(methods: Dict[str, Dict[int, Dict[str, Any]]], baseline: str) -> List[str]:
    sites = next(iter(next(iter(methods.values())).values()))["sites"]
    modalities = next(iter(next(iter(methods.values())).values()))["config"]["synthetic"].get("modalities", [])
    names = [f"{s} ({m})" if m else s for s, m in zip(sites, list(modalities) + [""] * len(sites))]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(sites)]
    base = methods.get(baseline, {})
    for name, runs in methods.items():
        cells = []
        for s in sites:
            cell = fmt([final_sites(runs[k])[s] for k in sorted(runs)])
            if name != baseline and base:
                d = paired(runs, base, lambda r, s=s: final_sites(r)[s])
                if d:
                    cell += f"; Δ {fmt_diff(d)}"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report_of(records: List[Dict[str, Any]], split: str) -> str:
    """The tables of committed records of any kind: fairness runs (``benchmarks/fair_report.py``), the
    personalisation comparison (``benchmarks/personal_report.py``) or other segmentation runs (:func:`report`)."""
    import fair_report
    import personal_report

    if records and fair_report.is_fairness_record(records[0]):
        return fair_report.report(records, split=split)
    if any(personal_report.is_personal_record(r) for r in records):
        return personal_report.report(records, split=split)
    return report(records, split=split)


def report(records: List[Dict[str, Any]], baseline: str = "fedavg", split: str = "test") -> str:
    """Markdown: per benchmark, the main table and the per-site table, of the ``split`` figures."""
    global SPLIT
    if split not in ("test", "val"):
        raise ValueError(f"split must be test or val, got {split!r}")
    SPLIT = split
    out = []
    for bench, methods in group(records).items():
        out += [f"### {bench}", "", *main_table(methods, baseline), "", f"Per site ({SPLIT} Dice; Δ: paired "
                f"difference to {baseline}, 95% CI):", "", *site_table(methods, baseline), ""]
    return "\n".join(out).rstrip() + "\n"


BEGIN = "<!-- tables: {} -->"
END = "<!-- end of tables -->"
DOCS_DIR = os.path.join(ROOT, "docs")


def committed_reports() -> Dict[str, Tuple[str, str, str]]:
    """``{block name: (records file, split, tables file)}`` of every committed record set under docs/results."""
    out = {}
    results = os.path.join(DOCS_DIR, "results")
    for name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        for records, split, tables, block in (("records.jsonl", "test", "tables.md", name),
                                              ("tuning.jsonl", "val", "tuning.md", f"{name}/tuning")):
            path = os.path.join(results, name, records)
            if os.path.isfile(path):
                out[block] = (path, split, os.path.join(results, name, tables))
    return out


def replace_blocks(text: str, tables: Dict[str, str]) -> str:
    """``text`` with the content of every quoted block replaced by the regenerated tables of its name."""
    for name, content in tables.items():
        marker = BEGIN.format(f"results/{name}")
        pos = 0
        while (start := text.find(marker, pos)) >= 0:
            end = text.index(END, start)
            text = text[:start + len(marker)] + "\n" + content + text[end:]
            pos = start + len(marker) + 1 + len(content) + len(END)
    return text


def update_docs() -> List[str]:
    """Regenerate every tables file and every quoted block; returns the files written."""
    written, tables = [], {}
    for block, (records, split, path) in committed_reports().items():
        tables[block] = report_of(load_records([records]), split)
        with open(path, "w") as f:
            f.write(tables[block])
        written.append(path)
    for name in sorted(os.listdir(DOCS_DIR)):
        if name.endswith(".md"):
            path = os.path.join(DOCS_DIR, name)
            with open(path) as f:
                text = f.read()
            new = replace_blocks(text, tables)
            if new != text:
                with open(path, "w") as f:
                    f.write(new)
                written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("records", nargs="*", help="JSON-lines records of benchmarks/bare_loop.py")
    ap.add_argument("--docs", action="store_true", help="regenerate the committed tables and the docs' quotes")
    ap.add_argument("--baseline", default="fedavg", help="method label the differences are taken against")
    ap.add_argument("--split", default="test", choices=("test", "val"),
                    help="figures of the test split (reports) or of the validation split (choosing settings)")
    ap.add_argument("--write", help="write the tables to this file instead of printing them")
    args = ap.parse_args(argv)
    if args.docs:
        for path in update_docs():
            print(f"wrote {os.path.relpath(path, ROOT)}")
        return
    if not args.records:
        ap.error("give records, or --docs")
    text = report(load_records(args.records), args.baseline, args.split)
    if args.write:
        with open(args.write, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
