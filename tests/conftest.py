from pathlib import Path

import numpy as np
import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def shared_dataset(name: str) -> Path:
    """Path of a shared data set, or skip the test when the shared folder is absent."""
    path = SHARED_DATASETS / name
    if not path.exists():
        pytest.skip(f"shared data set {name} not available")
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
