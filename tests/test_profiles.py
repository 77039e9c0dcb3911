"""Tests for ctre_edge.profiles: the shipped device profiles and the validating loader."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctre_edge import profiles
from ctre_edge.console import profile_rows
from ctre_edge.errors import ConfigError
from ctre_edge.profiles import Profile, ProfileError, list_profiles, load_profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEVICES = [
    "rpi-zero-2w",
    "rpi-3b-plus",
    "rpi-4b-2gb",
    "rpi-4b-8gb",
    "rpi-5-4gb",
    "rpi-5-8gb",
    "jetson-orin-nano-8gb",
    "esp32-s3",
    "stm32h743",
    "rp2350",
]
MCUS = {"esp32-s3", "stm32h743", "rp2350"}


# --- a minimal TOML writer, so tests can build files from dicts -------------------------


def _toml_str(s: str) -> str:
    """A TOML basic string; control characters and DEL must be escaped."""
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)  # repr gives inf, -inf, 1e+16: all TOML
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dumps(data: dict) -> str:
    return "".join(f"{_toml_str(k)} = {_toml_value(v)}\n" for k, v in data.items())


def shipped_data(name: str) -> dict:
    """The parsed content of a shipped profile, to mutate in tests."""
    return tomllib.loads(load_profile(name).path.read_text(encoding="utf-8"))


def write(tmp_path: Path, data: dict | str, filename: str = "board.toml") -> Path:
    path = tmp_path / filename
    path.write_text(data if isinstance(data, str) else dumps(data), encoding="utf-8")
    return path


# --- shipped profiles -----------------------------------------------------------------


def test_listed_devices_exist_and_nothing_else_is_shipped():
    assert [p.name for p in list_profiles()] == sorted(DEVICES)


@pytest.mark.parametrize("name", DEVICES)
def test_shipped_profile_is_valid_and_named_after_its_file(name):
    p = load_profile(name)
    assert p.name == name == p.path.stem
    assert 1 <= p.threads <= p.cores
    assert p.can_train is (name not in MCUS)
    if p.can_train:
        assert 1 <= p.train_budget_bytes <= p.ram_bytes
    else:
        assert p.model_budget_bytes is not None


def test_known_hardware_figures():
    zero = load_profile("rpi-zero-2w")
    assert (zero.cores, zero.ram_bytes, zero.similarity_sample_cap) == (4, 512 * 2**20, 256)
    assert load_profile("jetson-orin-nano-8gb").cores == 6
    assert load_profile("stm32h743").flash_bytes == 2 * 2**20
    assert load_profile("esp32-s3").ram_bytes == 512 * 2**10


def test_list_is_sorted_and_loading_by_path_gives_the_same_profile():
    listed = list_profiles()
    assert [p.name for p in listed] == sorted(p.name for p in listed)
    for p in listed:
        assert load_profile(str(p.path)) == p
        assert load_profile(p.path) == p  # os.PathLike is accepted too


def test_profile_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_profile("rpi-5-8gb").threads = 1


def test_profile_rows_are_readable_strings():
    rows = dict(profile_rows(load_profile("rpi-zero-2w")))
    assert rows["ram_bytes"] == "512.0 MiB"
    assert rows["train_budget_bytes"] == "288.0 MiB"
    assert rows["max_params"] == "2,000,000"
    assert rows["flash_bytes"] == "-"
    mcu = dict(profile_rows(load_profile("esp32-s3")))
    assert mcu["ram_bytes"] == "512.0 KiB"
    assert mcu["can_train"].startswith("no")
    assert dict(profile_rows(load_profile("rpi-4b-8gb")))["ram_bytes"] == "8.0 GiB"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in profile_rows(load_profile("rp2350")))


# --- error cases ----------------------------------------------------------------------


def test_profile_error_is_a_config_error():
    assert issubclass(ProfileError, ConfigError) and issubclass(ProfileError, ValueError)
    assert ProfileError.exit_code == ConfigError.exit_code


def test_unknown_name_lists_shipped_profiles_and_suggests():
    pattern = r"unknown profile 'rpi-zero' \(did you mean 'rpi-zero-2w'\?\)"
    with pytest.raises(ProfileError, match=pattern) as e:
        load_profile("rpi-zero")
    assert all(name in str(e.value) for name in DEVICES)


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match=r"profile file not found: .*nothing\.toml"):
        load_profile(str(tmp_path / "nothing.toml"))


def test_directory_is_not_a_profile(tmp_path):
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ProfileError, match=r"dir\.toml: cannot read the file"):
        load_profile(str(tmp_path / "dir.toml"))


def test_invalid_toml_names_the_line(tmp_path):
    path = write(tmp_path, 'name = "x"\ncores = = 4\n')
    with pytest.raises(ProfileError, match=r"board\.toml: not valid TOML: .*line 2"):
        load_profile(str(path))


def test_not_utf8(tmp_path):
    path = tmp_path / "board.toml"
    path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ProfileError, match=r"not UTF-8 text"):
        load_profile(str(path))


def test_budget_above_ram_exact_message(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data["train_budget_bytes"] = 600_000_000
    path = write(tmp_path, data, "rpi-zero-2w.toml")
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    assert str(e.value) == (
        "rpi-zero-2w.toml: 'train_budget_bytes' must be an int in [1, 536870912] (ram_bytes); got 600000000."
    )


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("threads", 5, r"'threads' must be an int in \[1, 4\] \(cores\); got 5"),
        ("cores", True, r"'cores' must be an int >= 1; got bool true"),
        ("cores", 4.0, r"'cores' must be an int >= 1; got float 4.0"),
        ("ram_bytes", "512MB", r"'ram_bytes' must be an int >= 1; got string '512MB'"),
        ("ram_bytes", 0, r"'ram_bytes' must be an int >= 1; got 0"),
        ("max_params", -5, r"'max_params' must be an int >= 1; got -5"),
        ("similarity_sample_cap", [256], r"'similarity_sample_cap' must be an int >= 1; got an array"),
        ("cores", {"big": 4}, r"'cores' must be an int >= 1; got a table"),
        ("can_train", "yes", r"'can_train' must be true or false; got string 'yes'"),
        ("name", 3, r"'name' must be a non-empty string; got 3"),
        ("description", "  ", r"'description' must be a non-empty string; got string '  '"),
        ("train_budget_bytes", 0, r"'train_budget_bytes' must be an int in \[1, 536870912\] .*got 0"),
    ],
)
def test_bad_value(tmp_path, key, value, pattern):
    data = shipped_data("rpi-zero-2w")
    data[key] = value
    with pytest.raises(ProfileError, match=pattern):
        load_profile(str(write(tmp_path, data)))


def test_huge_value_is_shortened(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data["train_budget_bytes"] = 10**200
    with pytest.raises(ProfileError, match=r"got \d+\.\.\.\d+\.$") as e:
        load_profile(str(write(tmp_path, data)))
    assert len(str(e.value)) < 200


def test_bound_not_rechecked_when_its_anchor_is_invalid(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data["cores"] = 0
    with pytest.raises(ProfileError) as e:
        load_profile(str(write(tmp_path, data)))
    assert "'cores'" in str(e.value) and "'threads'" not in str(e.value)


def test_unknown_key_suggests_the_closest(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data["thread"] = data.pop("threads")
    with pytest.raises(ProfileError, match=r"unknown key 'thread' \(did you mean 'threads'\?\)") as e:
        load_profile(str(write(tmp_path, data)))
    assert "missing required key 'threads'" in str(e.value)


def test_unknown_table_is_reported(tmp_path):
    text = write(tmp_path, shipped_data("rpi-zero-2w")).read_text() + "[cpu]\nclock = 1\n"
    with pytest.raises(ProfileError, match=r"unknown key 'cpu'"):
        load_profile(str(write(tmp_path, text)))


def test_missing_required_key(tmp_path):
    data = shipped_data("rpi-zero-2w")
    del data["cores"]
    with pytest.raises(ProfileError, match=r"missing required key 'cores' \(an int >= 1\)"):
        load_profile(str(write(tmp_path, data)))


def test_training_device_needs_a_train_budget(tmp_path):
    data = shipped_data("rpi-5-4gb")
    del data["train_budget_bytes"]
    with pytest.raises(ProfileError, match=r"missing required key 'train_budget_bytes'.*can_train is true"):
        load_profile(str(write(tmp_path, data)))


def test_inference_device_needs_a_model_budget(tmp_path):
    data = shipped_data("esp32-s3")
    del data["model_budget_bytes"]
    with pytest.raises(ProfileError, match=r"missing required key 'model_budget_bytes'.*can_train is false"):
        load_profile(str(write(tmp_path, data)))


def test_model_budget_is_bounded_by_ram_plus_flash(tmp_path):
    data = shipped_data("stm32h743")
    data["model_budget_bytes"] = 4 * 2**20
    pattern = (
        r"'model_budget_bytes' must be an int in \[1, 3145728\] \(ram_bytes \+ flash_bytes\); "
        r"got 4194304"
    )
    with pytest.raises(ProfileError, match=pattern):
        load_profile(str(write(tmp_path, data)))


def test_all_problems_in_one_line(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data.update(cores=0, threads=True, colours=3)
    del data["arch"]
    with pytest.raises(ProfileError) as e:
        load_profile(str(write(tmp_path, data)))
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(".")
    for part in ("unknown key 'colours'", "missing required key 'arch'", "'cores'", "'threads'"):
        assert part in msg


def test_user_profile_may_have_any_name(tmp_path):
    data = shipped_data("rpi-zero-2w")
    data["name"] = "my-board"
    assert load_profile(str(write(tmp_path, data, "whatever.toml"))).name == "my-board"


def test_shipped_profile_name_must_match_stem(tmp_path, monkeypatch):
    data = shipped_data("rpi-zero-2w")
    data["name"] = "other"
    path = write(tmp_path, data, "mine.toml")
    monkeypatch.setattr(profiles, "_shipped", lambda: {"mine": path})
    pattern = r"'name' must be the file stem 'mine' for a shipped profile; got string 'other'"
    with pytest.raises(ProfileError, match=pattern):
        load_profile("mine")


# --- fuzzing: malformed content never escapes as anything but ProfileError ------------

KEYS = [row[0] for row in profiles._SCHEMA]
scalars = (
    st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.sampled_from([0, -1, 1, 2**63, 10**4000])
    | st.floats()
    | st.booleans()
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
keys = st.sampled_from(KEYS) | st.text(max_size=12)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "fuzz.toml"


def _check_load(path: Path) -> None:
    try:
        profile = load_profile(str(path))
    except ProfileError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, msg
    else:
        assert isinstance(profile, Profile)


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_fuzz_arbitrary_text(fuzz_file, text):
    fuzz_file.write_bytes(text.encode("utf-8", "surrogatepass"))
    _check_load(fuzz_file)


@FUZZ
@given(data=st.dictionaries(keys, values, max_size=16))
def test_fuzz_arbitrary_tables(fuzz_file, data):
    fuzz_file.write_text(dumps(data), encoding="utf-8")
    _check_load(fuzz_file)


@FUZZ
@given(
    base=st.sampled_from(DEVICES),
    changes=st.dictionaries(st.sampled_from(KEYS), values, max_size=4),
    drop=st.sets(st.sampled_from(KEYS), max_size=3),
)
def test_fuzz_mutated_shipped_profiles(fuzz_file, base, changes, drop):
    data = {k: v for k, v in shipped_data(base).items() if k not in drop}
    data.update(changes)
    fuzz_file.write_text(dumps(data), encoding="utf-8")
    _check_load(fuzz_file)


def test_deeply_nested_toml(tmp_path):
    path = write(tmp_path, "a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ProfileError, match=r"not valid TOML"):
        load_profile(str(path))


def test_int_longer_than_python_digit_limit(tmp_path):
    path = write(tmp_path, "cores = " + "9" * 5000 + "\n")
    with pytest.raises(ProfileError, match=r"not valid TOML") as e:
        load_profile(str(path))
    assert re.fullmatch(r"[^\n]{1,400}", str(e.value))
