"""Shared fixtures: one converted-model cache for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh model cache, so every session exercises the GGUF conversion once."""
    return tmp_path_factory.mktemp("model-cache")
