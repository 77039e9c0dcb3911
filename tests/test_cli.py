import json

import pytest
from typer.testing import CliRunner

from ctre_edge.cli import app

runner = CliRunner()
FAST = ["--hidden", "32,32", "--epsilon", "3", "--epochs", "3", "--quiet"]


def run(*args):
    return runner.invoke(app, list(args))


def test_train_json_is_the_only_stdout(tmp_path):
    out = tmp_path / "m.ctre"
    r = run("train", "--data", "builtin:digits", "--method", "set", *FAST, "--json", "--out", str(out))
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    for key in ("test_accuracy", "best_epoch", "nnz", "density", "epochs", "seconds_per_epoch"):
        assert key in doc
    assert doc["epochs"] == 3 and len(doc["nnz"]) == 3 and out.exists()

    r = run("info", str(out), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["nnz"] == doc["nnz"]
    r = run("info", str(out))
    assert r.exit_code == 0 and r.stdout == "" and "connections" in r.stderr
    r = run("evaluate", str(out), "--data", "builtin:digits", "--json")
    assert r.exit_code == 0 and 0 <= json.loads(r.stdout)["accuracy"] <= 1


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "m.ctre"
    out.write_bytes(b"precious")
    r = run("train", *FAST, "--out", str(out))
    assert r.exit_code == 6 and "--force" in r.stderr
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("args, code, text", [
    (["train", "--hidden", "10,x"], 2, "--hidden must be"),
    (["train", "--method", "magic"], 2, "'method' must be one of"),
    (["train", "--epochs", "0"], 2, "'epochs' must be an int"),
    (["train", "--data", "missing.npz"], 4, "not found"),
    (["train", "--data", "builtin:nope"], 4, "unknown built-in data set"),
    (["info", "missing.ctre"], 5, "not found"),
])
def test_errors_are_one_line_with_exit_code(args, code, text):
    r = run(*args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert text in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0
    assert r.stdout == ""


def test_corrupt_model_and_bad_data(tmp_path):
    bad = tmp_path / "bad.ctre"
    bad.write_bytes(b"hello")
    r = run("info", str(bad))
    assert r.exit_code == 5 and "Traceback" not in r.stderr
    npz = tmp_path / "d.npz"
    npz.write_bytes(b"not an npz")
    r = run("train", "--data", str(npz), *FAST)
    assert r.exit_code == 4 and "cannot read" in r.stderr


def test_debug_shows_the_traceback():
    r = run("--debug", "info", "missing.ctre")
    assert r.exit_code != 0 and r.exception is not None
