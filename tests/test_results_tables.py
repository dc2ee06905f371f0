"""Every table the docs show from in-process runs is what the committed records give, byte for byte.

``docs/results/<name>/records.jsonl`` (test split) and ``tuning.jsonl`` (validation split), written by
``benchmarks/bare_loop.py --out`` or ``benchmarks/fair_loop.py --out``, have ``tables.md`` / ``tuning.md`` beside them;
the docs quote them between ``<!-- tables: results/<name> -->`` (or ``results/<name>/tuning``) and
``<!-- end of tables -->``. ``python benchmarks/loop_report.py --docs`` regenerates all of them.
"""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import loop_report  # noqa: E402

REPORTS = loop_report.committed_reports()


def quoted_blocks(text, name):
    marker = loop_report.BEGIN.format(f"results/{name}")
    blocks, pos = [], 0
    while (start := text.find(marker, pos)) >= 0:
        end = text.index(loop_report.END, start)
        blocks.append(text[start + len(marker) + 1:end])
        pos = end
    return blocks


def test_there_are_committed_records():
    assert REPORTS, "no docs/results/*/records.jsonl or tuning.jsonl"


@pytest.mark.parametrize("name", sorted(REPORTS))
def test_tables_file_and_docs_equal_what_the_records_give(name):
    records, split, tables = REPORTS[name]
    generated = loop_report.report_of(loop_report.load_records([records]), split)
    with open(tables) as f:
        assert f.read() == generated, f"{tables} is outdated: run python benchmarks/loop_report.py --docs"
    quotes = []
    for doc in sorted(os.listdir(loop_report.DOCS_DIR)):
        if doc.endswith(".md"):
            with open(os.path.join(loop_report.DOCS_DIR, doc)) as f:
                quotes += [(doc, b) for b in quoted_blocks(f.read(), name)]
    assert quotes, f"no doc quotes the tables of results/{name}"
    for doc, block in quotes:
        assert block == generated, f"{doc} quotes outdated tables of results/{name}"


def test_replace_blocks_rewrites_only_the_named_block():
    text = "a\n<!-- tables: results/x -->\nold\n<!-- end of tables -->\nb\n<!-- tables: results/y -->\nkeep\n" \
           "<!-- end of tables -->\n"
    out = loop_report.replace_blocks(text, {"x": "| new |\n"})
    assert quoted_blocks(out, "x") == ["| new |\n"] and quoted_blocks(out, "y") == ["keep\n"]
    assert loop_report.replace_blocks(out, {"x": "| new |\n"}) == out
