"""The package's layout by role holds: lower layers never import higher ones, only ``medflare.flare`` imports FLARE,
and every module path from before the layout still names the same module (job configs, resume files and user code
that name them keep working)."""

import ast
import copy
import importlib
import json
import os

import pytest

from flare_config import Component, check_component
from jobspec import JOBS, job_files

import medflare
from medflare import MOVED_MODULES

PACKAGE_DIR = os.path.dirname(os.path.abspath(medflare.__file__))

LAYERS = ["keys", "common", "data", "segmentation", "algorithms", "classification", "networks", "artefacts", "flare"]
"""Sub-packages (and top-level modules) from the bottom up: each may import its own layer and those before it."""


def _modules():
    for folder, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, PACKAGE_DIR)[:-3].split(os.sep)
                yield path, [p for p in rel if p != "__init__"], name == "__init__.py"


def _package_imports(path, parts, is_package):
    """Absolute names (``medflare.x.y``) of the package modules a file imports, and whether it imports nvflare at
    module level."""
    tree = ast.parse(open(path).read())
    found, nvflare_at_top = set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                found.add(".".join(["medflare", *base, *([node.module] if node.module else [])]))
            elif node.module and node.module.startswith("medflare"):
                found.add(node.module)
            elif node.module and node.module.split(".")[0] == "nvflare" and node in tree.body:
                nvflare_at_top = True
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("medflare"))
            nvflare_at_top |= node in tree.body and any(a.name.split(".")[0] == "nvflare" for a in node.names)
    return found, nvflare_at_top


def _layer(module_parts):
    return LAYERS.index(module_parts[0]) if module_parts and module_parts[0] in LAYERS else None


def test_every_module_belongs_to_a_layer():
    strays = [".".join(p) for _, p, _ in _modules() if p and _layer(p) is None]
    assert not strays, f"modules outside the layout (add them to a sub-package): {strays}"


def test_no_layer_imports_a_higher_one():
    upward = []
    for path, parts, is_package in _modules():
        if not parts:
            continue
        imports, _ = _package_imports(path, parts, is_package)
        for name in imports:
            target = name.split(".")[1:]
            if target and _layer(target) is not None and _layer(target) > _layer(parts):
                upward.append(f"{'.'.join(parts)} -> {'.'.join(target)}")
    assert not upward, upward


def test_only_the_flare_glue_imports_flare():
    outside = [".".join(p) for path, p, pkg in _modules() if p and p[0] != "flare"
               and _package_imports(path, p, pkg)[1]]
    assert not outside, f"modules outside medflare.flare importing nvflare at module level: {outside}"


def test_pure_layers_are_importable_without_flare_glue():
    """Importing the pure layers does not load the FLARE glue (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; import medflare.algorithms.fairness, medflare.segmentation.training, "
            "medflare.common.results, medflare.artefacts.trained_model; "
            "print(sorted(m for m in sys.modules if m.startswith('medflare.flare')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(PACKAGE_DIR)})
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_old_module_path_is_the_new_module(old):
    module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED_MODULES[old])
    assert module.__spec__.name == MOVED_MODULES[old]  # the module keeps its own spec (reload, find_spec)


def test_old_class_paths_name_the_same_classes():
    from medflare.executors import SegmentationExecutor
    from medflare.flare.executors import SegmentationExecutor as New
    from medflare.networks import FeatureUNet
    from medflare.segmentation.networks import FeatureUNet as NewNet

    assert SegmentationExecutor is New and FeatureUNet is NewNet
    assert importlib.import_module("medflare.classification.reporting").FairnessScatterAndGather.__module__ == \
        "medflare.flare.fairness_workflow"


def _old_paths(config):
    """A job config with every component path written as it was before the layout."""
    new_to_old = {new: old for old, new in MOVED_MODULES.items()}
    text = json.dumps(config)
    for new in sorted(new_to_old, key=len, reverse=True):
        text = text.replace(f'"{new}.', f'"{new_to_old[new]}.')
    return json.loads(text)


def _components(node):
    if isinstance(node, dict):
        if isinstance(node.get("path"), str) and node["path"].startswith("medflare."):
            yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


@pytest.mark.parametrize("job", sorted(JOBS))
def test_job_configs_written_with_old_paths_still_build(job):
    """A job folder generated before the layout (old class paths) still names importable classes that take its
    arguments."""
    files = job_files(JOBS[job])
    checked = 0
    for name, config in files.items():
        if not os.path.basename(name).startswith("config_fed"):
            continue
        old = _old_paths(copy.deepcopy(config))
        for component in _components(old):
            assert not component["path"].startswith(("medflare.flare.", "medflare.algorithms.")), component["path"]
            check_component(Component(component["path"], component.get("args", {})))
            checked += 1
    assert checked > 0
