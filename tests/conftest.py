"""Shared fixtures: paths to the real sample data and small synthetic arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EPISEG_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with the real microscopy volumes (../shared/data)."""
    if not (SHARED_DATA / "sample_patch.h5").exists():
        pytest.skip(f"real sample data not found in {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
