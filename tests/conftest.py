"""Shared fixtures. ``custom/`` is on ``sys.path`` (pytest.ini), so ``import medflare`` uses the single source."""

import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_site_config(monkeypatch, tmp_path_factory):
    """No test sees a developer's MEDFLARE_SITE_CONFIG; synthetic data is cached once per test session."""
    monkeypatch.delenv("MEDFLARE_SITE_CONFIG", raising=False)
    cache = os.environ.get("MEDFLARE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "medflare-cache")
    monkeypatch.setenv("MEDFLARE_CACHE_DIR", cache)
