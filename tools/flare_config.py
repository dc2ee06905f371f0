"""A small writer of FLARE's job-folder format: components, argument checks, canonical JSON and the shipped code.

FLARE builds every component of a job from ``{"id", "path", "args"}``: it imports ``path`` and calls the class with
``args``. :func:`check_component` does the same import and binds the arguments to the constructor's signature
(following ``**kwargs`` up the class hierarchy) without building anything, so a job with a misspelled class or
argument fails when it is generated, not at a site. :func:`dump_json` writes the one canonical text of a config,
which lets a test compare committed job folders with what the spec generates, byte for byte.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Set

PACKAGE = "medflare"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM_DIR = os.path.join(ROOT, "custom")
PACKAGE_DIR = os.path.join(CUSTOM_DIR, PACKAGE)
if CUSTOM_DIR not in sys.path:
    sys.path.insert(0, CUSTOM_DIR)  # check_component imports the classes a job names
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


class JobConfigError(ValueError):
    """A component's class cannot be imported or does not accept its arguments."""


@dataclass(frozen=True)
class Component:
    """One FLARE component: a class path and its constructor arguments."""

    path: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def entry(self, component_id: str) -> Dict[str, Any]:
        """The ``{"id", "path", "args"}`` entry of a FLARE config."""
        return {"id": component_id, "path": self.path, "args": dict(self.args)}

    def with_args(self, **changes: Any) -> "Component":
        """The same class with ``changes`` set in its arguments."""
        return Component(self.path, {**self.args, **changes})


def import_class(path: str) -> type:
    """The class named by a dotted ``path``, as FLARE imports it."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as e:
        raise JobConfigError(f"cannot import {path!r}: {e}") from e
    if not inspect.isclass(cls):
        raise JobConfigError(f"{path!r} is not a class")
    return cls


def accepted_arguments(cls: type) -> Optional[Set[str]]:
    """Names the constructor of ``cls`` accepts, following ``**kwargs`` to the base classes (``None``: any)."""
    names: Set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        params = list(inspect.signature(klass.__init__).parameters.values())[1:]
        names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            return names
    return None


def check_component(component: Component) -> type:
    """Import the component's class and check that it accepts every argument; returns the class.

    Raises:
        JobConfigError: naming the class and the arguments it does not take.
    """
    cls = import_class(component.path)
    accepted = accepted_arguments(cls)
    unknown = sorted(set(component.args) - accepted) if accepted is not None else []
    if unknown:
        raise JobConfigError(f"{component.path} takes no argument {unknown}; it takes {sorted(accepted or ())}")
    return cls


def dump_json(data: Mapping[str, Any]) -> str:
    """The canonical text of a config file (two-space indent, keys in the order written, final newline)."""
    return json.dumps(data, indent=2) + "\n"


def ship_code(app_dir: str) -> None:
    """Put a fresh copy of the ``medflare`` package into ``app_dir/custom`` (FLARE ships that folder with the job;
    its zip drops directory symlinks, so it must be a real copy)."""
    target = os.path.join(app_dir, "custom", PACKAGE)
    if os.path.islink(target):
        os.remove(target)
    elif os.path.exists(target):
        shutil.rmtree(target)
    shutil.copytree(PACKAGE_DIR, target, ignore=IGNORE)
