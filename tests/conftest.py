import shutil
import subprocess
import sys
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


@pytest.fixture(scope="session")
def warmed_cache_template(tmp_path_factory):
    """One cold ``ctre-edge warmup --profile rpi-zero-2w`` into an empty kernel cache for the whole
    session (about a minute on 2 cores), and its CompletedProcess. Tests never use the cache directly:
    ``copy_warmed_cache`` gives each its own copy, so what one test compiles cannot make another's
    check pass.

    Under that profile warmup runs its steps one fresh process at a time, the path a small device
    takes; without a profile it runs the same steps in one process. Both compile the same kernels, so
    one cold run serves the checks of that path (test_device) and every test that needs a warm cache;
    each cold compile costs the suite about a minute."""
    cache = tmp_path_factory.mktemp("warmed") / "cache"
    evict_library_pages()  # the step peaks it prints are checked (test_device)
    r = subprocess.run([sys.executable, "-m", "ctre_edge.cli", "--cache-dir", str(cache), "warmup",
                        "--profile", "rpi-zero-2w"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return cache, r


def copy_warmed_cache(template, dest: Path) -> Path:
    """A copy of the session's warmed kernel cache at ``dest`` (numba's index files name the source
    files, not the cache's own location, so a copy loads like the original)."""
    shutil.copytree(template[0], dest)
    return dest


def evict_library_pages() -> None:
    """Drop the page cache of the shared libraries a training process maps (llvmlite's, numba's, numpy's,
    and scipy's, which numba imports when it is installed) before a measured run.

    ``VmHWM`` counts the file pages of mapped libraries that the kernel maps around each page fault,
    and how many that is depends on the page cache: right after ``pip install`` writes
    ``libllvmlite.so`` (178 MB) it is fully cached and importing numba shows about 160 MiB resident,
    against about 97 MiB once those pages have been read back from disk, as after a reboot. The
    anonymous memory is the same in both states (about 38 MiB). The planner's runtime allowance is
    measured in the second state, so the memory tests start from it; README ("Devices, memory and threads") says
    what a freshly installed library adds. The clean file pages are dropped with posix_fadvise, which
    needs no privileges and changes nothing on disk.
    """
    import importlib.util
    import os

    for package in ("llvmlite", "numba", "numpy", "scipy"):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for path in Path(root).rglob("*.so"):
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except (OSError, AttributeError):
                    pass
                finally:
                    os.close(fd)
