"""Continuing a trained model on new data: `ctre-edge train --from MODEL --data NEW` (issue 17)."""

import numpy as np
import pytest
from typer.testing import CliRunner

from ctre_edge.cli import app
from ctre_edge.data import load_data
from ctre_edge.model import SparseMLP

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_csv(path, X, y):
    rows = np.column_stack([X.astype(np.int64), y])
    path.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A model trained on the first half of digits, and CSV files made from the second half."""
    d = tmp_path_factory.mktemp("continue")
    data = load_data("builtin:digits")
    X, y = data.X, data.y
    a = write_csv(d / "a.csv", X[:900], y[:900])
    model = d / "a.ctre"
    r = run("train", "--data", a, "--hidden", "32", "--epsilon", "4", "--epochs", "4", "--method", "set",
            "--seed", "5", "--quiet", "--no-checkpoint", "--out", model)
    assert r.exit_code == 0, r.stderr
    files = {"model": model, "b": write_csv(d / "b.csv", X[900:], y[900:]),
             "narrow": write_csv(d / "narrow.csv", X[900:, :60], y[900:]),
             "unseen": write_csv(d / "unseen.csv", X[900:], np.where(y[900:] == 3, 11, y[900:]))}
    return d, files


def test_continue_writes_a_new_model_with_the_old_settings_and_scaling(first, tmp_path):
    d, f = first
    before = f["model"].read_bytes()
    outs = []
    for name in ("b1.ctre", "b2.ctre"):
        r = run("train", "--from", f["model"], "--data", f["b"], "--epochs", "3", "--quiet", "--no-checkpoint",
                "--out", tmp_path / name)
        assert r.exit_code == 0, r.stderr
        outs.append(tmp_path / name)
    assert f["model"].read_bytes() == before
    assert outs[0].read_bytes() == outs[1].read_bytes(), "same model, data and settings give the same bytes"
    old, new = SparseMLP.load(f["model"]), SparseMLP.load(outs[0])
    assert new.sizes == old.sizes == [64, 32, 10]
    assert new.config["method"] == "set" and new.config["seed"] == 5 and new.config["epochs"] == 3
    np.testing.assert_array_equal(new.shift, old.shift)
    np.testing.assert_array_equal(new.scale, old.scale)
    assert not np.array_equal(new.layers[0].indices, old.layers[0].indices)  # it trained and evolved

    r = run("train", "--from", f["model"], "--data", f["b"], "--epochs", "1", "--quiet", "--no-checkpoint",
            "--refit-scaling", "--out", tmp_path / "refit.ctre")
    assert r.exit_code == 0, r.stderr
    refit = SparseMLP.load(tmp_path / "refit.ctre")
    assert not np.array_equal(refit.scale, old.scale)  # min-max of the new half: other maxima


@pytest.mark.parametrize("args, code, text", [
    (["--data", "{narrow}"], 4, "has 60 features; the model to continue expects 64"),
    (["--data", "{unseen}"], 4, "has label(s) 11 that the model to continue does not know"),
    (["--data", "{b}", "--hidden", "16"], 2, "hidden layers 16 differ from the model's 32"),
    (["--data", "{b}", "--out", "{model}", "--force"], 2, "--out must differ from --from"),
    (["--data", "{b}", "--resume", "{d}"], 2, "--from and --resume exclude each other"),
])
def test_incompatible_continuations_are_one_line(first, args, code, text):
    d, f = first
    before = f["model"].read_bytes()
    r = run("train", "--from", f["model"], *[a.format(d=d, **f) for a in args], "--epochs", "1", "--quiet")
    assert r.exit_code == code, r.stderr
    assert text in r.stderr and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert f["model"].read_bytes() == before


def test_continuing_is_planned_like_any_run(first):
    d, f = first
    import json

    plans = [run("plan", *args, "--data", f["b"], "--profile", "rpi-zero-2w", "--json")
             for args in (["--from", f["model"]], ["--hidden", "32", "--epsilon", "4", "--method", "set"])]
    assert [p.exit_code for p in plans] == [0, 0], plans[0].stderr
    continued, fresh = (json.loads(p.stdout) for p in plans)
    assert continued == fresh and continued["parts"]["model"] > 0
    r = run("train", "--refit-scaling", "--epochs", "1", "--quiet")
    assert r.exit_code == 2 and "--refit-scaling applies to --from" in r.stderr
