"""Shared fixtures. Kept tiny and fast: nothing heavy is imported or loaded here."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The test machines have 2 cores. torch reads these when it is first imported (also lazily, inside a
# test); importing torch here just to call set_num_threads would cost seconds for tests without it.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Test modules that import torch have been imported by now: cap its threads at 2."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(2)


@pytest.fixture(scope="session")
def iberia_dir() -> Path:
    """``../shared/data/iberia`` (real data, opt-in): skips the test when it is absent."""
    path = DATA_DIR / "iberia"
    if not path.is_dir() or not any(path.glob("*.nc")):
        pytest.skip(f"real data not found at {path} (needs the shared/ folder beside the repository)")
    return path


from _model_fixtures import cm_model, fine_data, sde_model  # noqa: E402,F401  (session fixtures)
