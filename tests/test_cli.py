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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    model = d / "m.ctre"
    r = run("train", "--data", "builtin:digits", *FAST, "--out", str(model), "--no-checkpoint")
    assert r.exit_code == 0, r.stderr
    return d, model


def test_export_then_predict_labels_and_probabilities(trained):
    import numpy as np

    from ctre_edge.data import load_data
    from ctre_edge.model import SparseMLP

    d, model = trained
    onnx_path = d / "m.onnx"
    r = run("export", str(model), str(onnx_path), "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["max_abs_diff"] <= 1e-5
    X = load_data("builtin:digits").X[:25]
    np.save(d / "x.npy", X)
    r = run("predict", str(onnx_path), "--data", str(d / "x.npy"), "--json")
    assert r.exit_code == 0, r.stderr
    expected = SparseMLP.load(model).predict(X)
    assert json.loads(r.stdout)["labels"] == expected.tolist()
    r = run("predict", str(onnx_path), "--data", str(d / "x.npy"), "--proba")
    lines = r.stdout.strip().splitlines()
    assert lines[0] == ",".join(str(c) for c in range(10)) and len(lines) == 26
    r = run("export", str(model), str(onnx_path))
    assert r.exit_code == 6 and "--force" in r.stderr


def test_predict_rejects_bad_model_and_bad_features(trained, tmp_path):
    import numpy as np

    d, model = trained
    r = run("export", str(model), str(tmp_path / "m.onnx"))
    good = (tmp_path / "m.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(good[: len(good) // 2])
    np.save(tmp_path / "x.npy", np.zeros((3, 64), np.float32))
    np.save(tmp_path / "wrong.npy", np.zeros((3, 63), np.float32))
    for args, code, text in [
        (["predict", str(tmp_path / "cut.onnx"), "--data", str(tmp_path / "x.npy")], 5, ""),
        (["predict", str(model), "--data", str(tmp_path / "x.npy")], 5, ""),  # a .ctre is not an ONNX file
        (["predict", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "wrong.npy")], 4, "64 features"),
        (["predict", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "none.npy")], 4, "not found"),
    ]:
        r = run(*args)
        assert r.exit_code == code, (args, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0


def test_export_for_a_microcontroller_checks_its_memory(trained, tmp_path):
    d, model = trained
    r = run("export", str(model), str(tmp_path / "ok.onnx"), "--profile", "stm32h743")
    assert r.exit_code == 0, r.stderr
    big = tmp_path / "big.ctre"
    assert run("train", "--hidden", "3000,3000", "--epsilon", "5", "--epochs", "1", "--quiet", "--out", str(big),
               "--no-checkpoint").exit_code == 0
    r = run("export", str(big), str(tmp_path / "big.onnx"), "--profile", "esp32-s3")
    assert r.exit_code == 3 and "esp32-s3" in r.stderr and not (tmp_path / "big.onnx").exists()


def test_info_features_ranks_inputs(trained):
    d, model = trained
    r = run("info", str(model), "--features", "--top", "5", "--json")
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    degrees = [row["connections"] for row in doc["top"]]
    assert len(degrees) == 5 and degrees == sorted(degrees, reverse=True)
    assert max(doc["degree"]) == degrees[0] and len(doc["degree"]) == 64
    r = run("info", str(model), "--features")
    assert r.exit_code == 0 and "\u2580" in r.stderr  # an 8x8 input gets a terminal heat map
    r = run("info", str(model), "--features", "--image-shape", "5x5")
    assert r.exit_code == 2 and "25 pixels" in r.stderr


def test_plan_json_and_profiles_commands():
    r = run("plan", "--profile", "rpi-4b-2gb", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["fits"] and doc["budget_bytes"] > doc["total_bytes"]
    r = run("profiles", "list", "--json")
    names = [p["name"] for p in json.loads(r.stdout)]
    assert {"rpi-zero-2w", "rpi-3b-plus", "rpi-4b-2gb", "rpi-4b-8gb", "rpi-5-4gb", "rpi-5-8gb",
            "jetson-orin-nano-8gb", "esp32-s3", "stm32h743", "rp2350"} <= set(names)
    r = run("profiles", "show", "rpi-zero-2w")
    assert r.exit_code == 0 and "train_budget_bytes" in r.stderr
    r = run("profiles", "show", "rpi-zero")
    assert r.exit_code == 2 and "rpi-zero-2w" in r.stderr


# --- the run layer: every option reaches TrainConfig; CLI and API share defaults ------------------------

def _capture_execute(monkeypatch):
    """Replace the run layer's execute step; return the list the prepared runs are appended to."""
    from ctre_edge import run as run_layer

    seen = []

    def fake_execute(prepared, **kwargs):
        seen.append((prepared, kwargs))
        raise SystemExit(0)

    monkeypatch.setattr(run_layer, "execute", fake_execute)
    return seen


def test_every_train_config_field_arrives_from_its_option(monkeypatch):
    from dataclasses import fields

    from ctre_edge.config import TrainConfig

    seen = _capture_execute(monkeypatch)
    r = run("train", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert seen[-1][0].config == TrainConfig(), "CLI defaults must equal TrainConfig's"
    given = dict(hidden=(7, 5), method="ctre-seq", epsilon=2.5, init="dense-glorot", zeta=0.3, epochs=4,
                 early_stop=7, batch_size=17, lr=0.02, momentum=0.8, l2=2e-4, lr_drop_epoch=3, seed=9,
                 scaling="standard", validation_fraction=0.2,
                 test_fraction=0.25, patience=6, similarity="sketch", similarity_samples=123,
                 similarity_workspace_mib=5, sketch_dim=64, eval_batch_size=77)
    assert set(given) == {f.name for f in fields(TrainConfig)}, "extend this test with the new field"
    assert all(given[f.name] != f.default for f in fields(TrainConfig)), "each value must differ from its default"
    args = []
    for name, value in given.items():
        args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if name == "hidden" else str(value)]
    r = run("train", "--quiet", *args)
    assert r.exit_code == 0, r.stderr
    assert seen[-1][0].config == TrainConfig(**given)


def test_cli_defaults_equal_the_api_defaults():
    import inspect

    from ctre_edge.api import CONFIG_PARAMS, SparseMLPClassifier
    from ctre_edge.cli import config_from_options, train

    cli = {n: p.default for n, p in inspect.signature(train).parameters.items()}
    api = inspect.signature(SparseMLPClassifier.__init__).parameters
    config = config_from_options(cli)
    for name in CONFIG_PARAMS:
        assert getattr(config, name) == api[name].default, name


def test_choices_come_from_the_tables():
    from ctre_edge.config import METHODS, SIMILARITIES

    r = run("train", "--method", "ctre_sim")
    assert r.exit_code == 2 and r.stdout == ""
    assert all(m in r.stderr for m in METHODS), r.stderr
    assert run("train", "--similarity", "approx").exit_code == 2
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert all(m in r.stdout for m in (*METHODS, *SIMILARITIES))


def test_a_profile_cap_is_listed_among_the_changes(monkeypatch):
    seen = _capture_execute(monkeypatch)
    r = run("train", "--profile", "rpi-zero-2w", "--hidden", "100", "--similarity-samples", "100000", "--quiet")
    assert r.exit_code == 0, r.stderr
    prepared = seen[-1][0]
    assert prepared.config.similarity_samples < 100000
    assert any(c.startswith("--similarity-samples") for c in prepared.changes), prepared.changes
    assert "--similarity-samples" in r.stderr


@pytest.mark.parametrize("args, option", [
    (["train", "--method", "sett"], "--method"),
    (["train", "--epochs", "abc"], "--epochs"),
    (["train", "--no-such-option"], "--no-such-option"),
])
def test_usage_errors_from_the_console_entry_point_are_one_line(args, option):
    """A typo rejected by the parser gets the same one-line error as any other bad input, and exit 2."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ctre_edge.cli", *args], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and option in lines[0] and "--help" in lines[0]
    assert "Traceback" not in r.stderr
