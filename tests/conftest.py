"""Fixtures every test file can use: a fixed seed per test, and the real data shared with the project."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

# Real data nobody on this project made (../shared/data from the repository root); absent for end users.
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same global RNG state, so a failure reproduces when run alone."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def shared_data() -> Path:
    """The shared real-data folder, or a clean skip that says where it was looked for."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared real data not found at {SHARED_DATA}")
    return SHARED_DATA
