"""Device profiles: what a board can run, read from small validated TOML files.

A profile tells the trainer and the exporter how much memory, how many threads and how
many parameters a device can afford. Shipped profiles live in ``firmware_profiles/``
(the package ``ctre_edge.firmware_profiles``); a user may pass the path of their own file.

Profile file schema
-------------------
One flat TOML table; sub-tables and unknown keys are rejected.

======================  ====  ================  ==========================================
key                     type  required          constraint and meaning
======================  ====  ================  ==========================================
name                    str   always            non-empty; equals the file stem for shipped
                                                profiles (``rpi-zero-2w.toml`` -> ``rpi-zero-2w``)
description             str   always            non-empty, human-readable device name
arch                    str   always            non-empty, e.g. "aarch64", "xtensa",
                                                "armv7e-m", "armv8-m"
cores                   int   always            >= 1, CPU cores
ram_bytes               int   always            >= 1, physical RAM (or SRAM) in bytes
can_train               bool  always            false for inference-only microcontrollers
train_budget_bytes      int   if can_train      in [1, ram_bytes]; RAM minus what the OS and
                                                its services keep. The Python interpreter and
                                                libraries are NOT subtracted here: the memory
                                                planner counts them.
threads                 int   always            in [1, cores], worker threads for kernels
max_params              int   always            >= 1, cap on connections + biases
max_layer_width         int   always            >= 1, cap on neurons in one hidden layer
similarity_sample_cap   int   always            >= 1, training samples used for the cosine
                                                similarity scores each epoch
flash_bytes             int   optional          >= 1, on-chip (or on-module) flash
model_budget_bytes      int   if not can_train  in [1, ram_bytes + flash_bytes]; bytes the
                                                exported model may occupy (for the C export:
                                                its const data + code, ``text`` of NAME.o)
workspace_budget_bytes  int   optional          in [1, ram_bytes]; RAM the C export's static
                                                workspace + stack may use (default ram_bytes)
======================  ====  ================  ==========================================

"int" means a TOML integer: ``true`` and ``4.0`` are rejected for int keys.
"""

from __future__ import annotations

import difflib
import os
import reprlib
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

from ctre_edge.errors import ConfigError

__all__ = ["Profile", "ProfileError", "list_profiles", "load_profile", "profile_rows"]


class ProfileError(ConfigError):
    """A device profile is missing, not valid TOML, or breaks the schema."""


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A validated device profile; see the module docstring for the meaning of each field.

    Build it with :func:`load_profile`, which validates; the constructor itself does not.
    """

    name: str
    description: str
    arch: str
    cores: int
    ram_bytes: int
    can_train: bool
    threads: int
    max_params: int
    max_layer_width: int
    similarity_sample_cap: int
    train_budget_bytes: int | None = None
    model_budget_bytes: int | None = None
    flash_bytes: int | None = None
    workspace_budget_bytes: int | None = None
    path: Path | None = None  # the TOML file it came from; None when built in code


_ALWAYS, _IF_TRAIN, _IF_INFER, _OPTIONAL = "always", "if can_train", "if not can_train", "optional"

# The whole schema. Each row: key, Python type, (lower bound, keys whose sum is the upper
# bound) or None, and when the key is required. Keys named in an upper bound come first,
# so their validated values are known when the dependent key is checked.
_SCHEMA: tuple[tuple[str, type, tuple[int, tuple[str, ...]] | None, str], ...] = (
    ("name", str, None, _ALWAYS),
    ("description", str, None, _ALWAYS),
    ("arch", str, None, _ALWAYS),
    ("cores", int, (1, ()), _ALWAYS),
    ("ram_bytes", int, (1, ()), _ALWAYS),
    ("flash_bytes", int, (1, ()), _OPTIONAL),
    ("can_train", bool, None, _ALWAYS),
    ("train_budget_bytes", int, (1, ("ram_bytes",)), _IF_TRAIN),
    ("threads", int, (1, ("cores",)), _ALWAYS),
    ("max_params", int, (1, ()), _ALWAYS),
    ("max_layer_width", int, (1, ()), _ALWAYS),
    ("similarity_sample_cap", int, (1, ()), _ALWAYS),
    ("model_budget_bytes", int, (1, ("ram_bytes", "flash_bytes")), _IF_INFER),
    ("workspace_budget_bytes", int, (1, ("ram_bytes",)), _OPTIONAL),
)
_KEYS = [row[0] for row in _SCHEMA]
_WHEN = {
    _IF_TRAIN: ", required when can_train is true",
    _IF_INFER: ", required when can_train is false",
}

# Values echoed in messages are shortened: a 4000-digit int or a long string would
# otherwise swamp the one-line message the CLI prints.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxlong = _SHORT.maxother = 40


def _show(value: Any) -> str:
    """Describe a parsed TOML value briefly, naming its type unless it is an int."""
    if isinstance(value, bool):  # before int: bool is a subclass of int
        return f"bool {str(value).lower()}"
    if isinstance(value, int):
        return _SHORT.repr(value)
    if isinstance(value, str):
        return f"string {_SHORT.repr(value)}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"{type(value).__name__} {value}"  # TOML dates and times


def _problem(key: str, expected: str, value: Any) -> str:
    """The one formatter for a bad value: ``'key' must be <expected>; got <value>``."""
    return f"{_SHORT.repr(key)} must be {expected}; got {_show(value)}"


def _expected(kind: type, low: int | None, high: int | None, high_keys: tuple[str, ...]) -> str:
    """Phrase what a key must hold, e.g. ``an int in [1, 536870912] (ram_bytes)``."""
    if kind is bool:
        return "true or false"
    if kind is str:
        return "a non-empty string"
    if high is None:
        return f"an int >= {low}"
    return f"an int in [{low}, {high}] ({' + '.join(high_keys)})"


def _upper(
    high_keys: tuple[str, ...], data: dict, good: dict
) -> tuple[int | None, tuple[str, ...]]:
    """Resolve an upper bound from already-validated keys; None when it cannot be trusted.

    The first key anchors the bound (it is required); later ones are optional addends that
    count as 0 when absent. A present-but-invalid key voids the bound, so one mistake is
    reported once rather than again as a spurious range error.
    """
    if not high_keys or high_keys[0] not in good:
        return None, ()
    if any(k in data and k not in good for k in high_keys):
        return None, ()
    used = tuple(k for k in high_keys if k in good)
    return sum(good[k] for k in used), used


def _validate(data: dict, filename: str, stem: str | None) -> dict:
    """Check ``data`` against ``_SCHEMA``; return the valid values or raise one ProfileError.

    ``stem`` is the file stem of a shipped profile (whose ``name`` must match it), else None.
    """
    problems = []
    for key in data:
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key {_SHORT.repr(key)}{hint}")

    good: dict[str, Any] = {}
    can_train = data.get("can_train")
    for key, kind, bounds, required in _SCHEMA:
        low, high_keys = bounds if bounds else (None, ())
        high, used = _upper(high_keys, data, good)
        expected = _expected(kind, low, high, used)
        if key not in data:
            # A conditional requirement is only judged once can_train itself is valid.
            needed = (
                required == _ALWAYS
                or (required == _IF_TRAIN and can_train is True)
                or (required == _IF_INFER and can_train is False)
            )
            if needed:
                when = _WHEN.get(required, "")
                problems.append(f"missing required key {key!r} ({expected}{when})")
            continue
        value = data[key]
        # bool is a subclass of int in Python, but TOML keeps them apart: reject true for an int.
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if ok and kind is str:
            ok = bool(value.strip())
        elif ok and kind is int:
            ok = low <= value and (high is None or value <= high)
        if ok:
            good[key] = value
        else:
            problems.append(_problem(key, expected, value))

    if stem is not None and "name" in good and good["name"] != stem:
        expected = f"the file stem {stem!r} for a shipped profile"
        problems.append(_problem("name", expected, good["name"]))
    if problems:
        raise ProfileError(f"{filename}: " + "; ".join(problems) + ".")
    return good


def _shipped() -> dict[str, Any]:
    """Map each shipped profile's name (file stem) to its resource file."""
    root = resources.files("ctre_edge.firmware_profiles")
    return {
        f.name[: -len(".toml")]: f
        for f in root.iterdir()
        if f.name.endswith(".toml") and f.is_file()
    }


def _one_line(text: str) -> str:
    """Collapse whitespace so messages from tomllib or the OS stay on one line."""
    return " ".join(text.split())


def _parse(raw: bytes, filename: str) -> dict:
    """Decode and parse TOML, turning every failure into a ProfileError."""
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as exc:
        msg = f"{filename}: not UTF-8 text (bad byte at offset {exc.start})."
        raise ProfileError(msg) from None
    try:
        return tomllib.loads(text)
    except RecursionError:
        msg = f"{filename}: not valid TOML: arrays or tables nested too deeply."
        raise ProfileError(msg) from None
    except ValueError as exc:
        # TOMLDecodeError says "(at line L, column C)"; a plain ValueError comes from ints
        # longer than Python's int-to-string digit limit.
        raise ProfileError(f"{filename}: not valid TOML: {_one_line(str(exc))}.") from None


def load_profile(name_or_path: str | os.PathLike[str]) -> Profile:
    """Load and validate a device profile.

    Parameters
    ----------
    name_or_path : str or os.PathLike
        The name of a shipped profile (e.g. ``"rpi-zero-2w"``, see :func:`list_profiles`),
        or the path of a ``.toml`` file. A string ending in ``.toml`` or containing a path
        separator is taken as a path.

    Returns
    -------
    Profile
        The validated profile, with ``path`` set to the file it was read from.

    Raises
    ------
    ProfileError
        If the name is unknown, the file is missing or unreadable, is not valid TOML, or
        breaks the schema. The message is one line and lists every problem in the file.
    """
    shipped = _shipped()
    given = os.fspath(name_or_path)
    is_path = (
        not isinstance(name_or_path, str)
        or given.endswith(".toml")
        or "/" in given
        or os.sep in given
    )
    if not is_path and given in shipped:
        source, stem = shipped[given], given
    elif is_path:
        source, stem = Path(given), None
    else:
        close = difflib.get_close_matches(given, list(shipped), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ProfileError(
            f"unknown profile {_SHORT.repr(given)}{hint}; "
            f"shipped profiles: {', '.join(sorted(shipped))}; or pass the path of a .toml file."
        )

    filename = source.name if source.name.isprintable() else repr(source.name)
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"profile file not found: {_SHORT.repr(given)}.") from None
    except OSError as exc:
        reason = _one_line(exc.strerror or str(exc))
        raise ProfileError(f"{filename}: cannot read the file: {reason}.") from None

    good = _validate(_parse(raw, filename), filename, stem)
    return Profile(**good, path=Path(str(source)))


def list_profiles() -> list[Profile]:
    """Load every shipped profile, sorted by name.

    Returns
    -------
    list of Profile

    Raises
    ------
    ProfileError
        If a shipped file is invalid (a packaging bug, caught by the test suite).
    """
    return [load_profile(name) for name in sorted(_shipped())]


def _format_bytes(n: int) -> str:
    """Binary units with one decimal, e.g. 536870912 -> '512.0 MiB'."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def profile_rows(profile: Profile) -> list[tuple[str, str]]:
    """Human-readable (field, value) pairs for printing a profile as a table.

    The field column uses the TOML keys, so a reader can find the line to edit.

    Parameters
    ----------
    profile : Profile

    Returns
    -------
    list of (str, str)
        Byte counts in binary units (``"512.0 MiB"``), counts with thousands separators,
        ``"-"`` for an absent optional value.
    """

    def size(n: int | None) -> str:
        return "-" if n is None else _format_bytes(n)

    return [
        ("name", profile.name),
        ("description", profile.description),
        ("arch", profile.arch),
        ("cores", str(profile.cores)),
        ("threads", str(profile.threads)),
        ("ram_bytes", size(profile.ram_bytes)),
        ("flash_bytes", size(profile.flash_bytes)),
        ("can_train", "yes" if profile.can_train else "no (inference only)"),
        ("train_budget_bytes", size(profile.train_budget_bytes)),
        ("model_budget_bytes", size(profile.model_budget_bytes)),
        ("workspace_budget_bytes", size(profile.workspace_budget_bytes)),
        ("max_params", f"{profile.max_params:,}"),
        ("max_layer_width", f"{profile.max_layer_width:,}"),
        ("similarity_sample_cap", f"{profile.similarity_sample_cap:,}"),
        ("path", "-" if profile.path is None else str(profile.path)),
    ]
