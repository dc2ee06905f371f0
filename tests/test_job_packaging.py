"""Every job ships exactly the code of custom/medflare, and names only classes that exist."""

import importlib
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from sync_jobs import differences, job_apps  # noqa: E402

APPS = job_apps()


def test_there_are_jobs():
    names = {os.path.basename(os.path.dirname(a)) for a in APPS}
    assert {"fedavg", "fedprox", "fedda", "fedda_cyclic"} <= names


@pytest.mark.parametrize("app", APPS, ids=[os.path.relpath(a, REPO) for a in APPS])
def test_shipped_code_matches_single_source(app):
    assert os.path.isdir(os.path.join(app, "custom")), \
        f"{os.path.relpath(app, REPO)} has no code copy: run python tools/sync_jobs.py (setup.sh does)"
    diffs = differences(app)
    assert not diffs, f"{os.path.relpath(app, REPO)} would ship code that differs from custom/medflare: {diffs[:10]}"


def test_stale_copy_is_detected(tmp_path):
    import shutil

    app = tmp_path / "job" / "app"
    (app / "config").mkdir(parents=True)
    shutil.copytree(os.path.join(REPO, "custom", "medflare"), app / "custom" / "medflare")
    assert differences(str(app)) == []
    with open(app / "custom" / "medflare" / "segmentation" / "metrics.py", "a") as f:
        f.write("\n# local edit\n")
    (app / "custom" / "medflare" / "extra.py").write_text("")
    diffs = differences(str(app))
    assert any("segmentation/metrics.py: differs" in d for d in diffs) and any("extra.py" in d for d in diffs)


def _paths(node):
    if isinstance(node, dict):
        if "path" in node and isinstance(node["path"], str):
            yield node["path"]
        for v in node.values():
            yield from _paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _paths(v)


@pytest.mark.parametrize("app", APPS, ids=[os.path.relpath(a, REPO) for a in APPS])
def test_config_classes_exist(app):
    for name in ("config_fed_server.json", "config_fed_client.json"):
        with open(os.path.join(app, "config", name)) as f:
            config = json.load(f)
        for path in _paths(config):
            # every class a site builds must pass a "medflare." / "nvflare." allow-list (site-installed code)
            assert path.startswith(("medflare.", "nvflare.")), f"{name}: {path} is neither medflare nor nvflare"
            module, _, cls = path.rpartition(".")
            assert hasattr(importlib.import_module(module), cls), f"{name}: {path} does not exist"


@pytest.mark.parametrize("app", APPS, ids=[os.path.relpath(a, REPO) for a in APPS])
def test_meta_deploys_the_app(app):
    with open(os.path.join(os.path.dirname(app), "meta.json")) as f:
        meta = json.load(f)
    assert os.path.basename(app) in meta["deploy_map"]
    assert meta["name"] == os.path.basename(os.path.dirname(app))
    for root, dirs, files in os.walk(os.path.dirname(app)):
        for entry in dirs + files:
            assert not os.path.islink(os.path.join(root, entry)), f"symlink in job: {os.path.join(root, entry)}"
