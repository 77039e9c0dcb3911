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


@pytest.fixture(scope="session")
def _user_cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg-cache")


@pytest.fixture(autouse=True)
def user_cache_home(_user_cache_home, monkeypatch):
    """XDG_CACHE_HOME of every test (and its subprocesses): parse caches go here, not to ~/.cache.

    The kernel cache is unaffected: the package set NUMBA_CACHE_DIR when the test session imported it.
    """
    monkeypatch.setenv("XDG_CACHE_HOME", str(_user_cache_home))
    return _user_cache_home
