"""ctre-edge: truly sparse training of highly sparse MLPs (CTRE, SET) on the device that runs them.

Importing the package is cheap: numba is imported only by the modules that train or run kernels.
It does one thing on import: unless ``NUMBA_CACHE_DIR`` is set, it points numba's kernel cache at a
per-user, per-version directory (``$XDG_CACHE_HOME/ctre-edge/<version>/numba``, by default under
``~/.cache``), so compiled kernels are reused across runs even when the package is installed in a
read-only location. Where that directory cannot be created, a per-user directory under the system
temp dir is used instead. This takes effect only if numba has not been imported yet.
"""

import os
import tempfile
from pathlib import Path

__version__ = "0.1.0"


def user_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ctre-edge`` (default ``~/.cache/ctre-edge``): the kernel and parse caches live here."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ctre-edge"


def default_cache_dir() -> Path:
    return user_cache_dir() / __version__ / "numba"


def configure_cache(directory=None) -> Path:
    """Set ``NUMBA_CACHE_DIR`` (``directory``, else the existing variable, else the default) and create it."""
    chosen = Path(directory) if directory else Path(os.environ.get("NUMBA_CACHE_DIR") or default_cache_dir())
    for candidate in (chosen, Path(tempfile.gettempdir()) / f"ctre-edge-{os.getuid()}" / __version__ / "numba"):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                os.environ["NUMBA_CACHE_DIR"] = str(candidate)
                return candidate
        except OSError:
            continue
    return chosen  # nothing writable: numba compiles in memory and warns that it cannot cache


configure_cache()
