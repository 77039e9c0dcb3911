"""The CLI's habits (issue 17): --version, shell completion, predict --format csv|jsonl."""

import csv
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctre_edge import __version__
from ctre_edge.cli import app

runner = CliRunner()


def test_version_prints_the_package_version():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout == f"ctre-edge {__version__}\n"


def complete(words: str, env=None):
    """What bash completion offers for the command line ``words`` (the cursor after the last word)."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = {"_CTRE_EDGE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword), **(env or {})}
    r = runner.invoke(app, [], prog_name="ctre-edge", env=env)
    assert r.exit_code == 0, r.output
    return r.stdout.split()


def test_shell_completion_completes_commands_options_and_choices():
    assert complete("ctre-edge tr") == ["train"]
    assert complete("ctre-edge train --meth") == ["--method"]
    assert complete("ctre-edge train --method ") == ["static", "set", "ctre-sim", "ctre-seq"]
    assert "inspect" in complete("ctre-edge data ")


def test_install_completion_writes_the_bash_script(tmp_path):
    r = runner.invoke(app, ["--install-completion", "bash"], prog_name="ctre-edge",
                      env={"HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert r.exit_code == 0, r.output
    script = (tmp_path / ".bash_completions" / "ctre-edge.sh").read_text()
    assert "_CTRE_EDGE_COMPLETE=complete_bash" in script
    assert ".bash_completions/ctre-edge.sh" in (tmp_path / ".bashrc").read_text()


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("habits")
    names = np.array([f"digit-{i}" for i in range(10)])
    from ctre_edge.data import load_data

    data = load_data("builtin:digits")
    np.savez(d / "train.npz", X=data.X, y=names[data.y])
    r = runner.invoke(app, ["train", "--data", str(d / "train.npz"), "--hidden", "32", "--epsilon", "4",
                            "--epochs", "3", "--quiet", "--no-checkpoint", "--out", str(d / "m.ctre")])
    assert r.exit_code == 0, r.stderr
    assert runner.invoke(app, ["export", str(d / "m.ctre"), str(d / "m.onnx")]).exit_code == 0
    np.save(d / "x.npy", data.X[:20])
    return d


def test_predict_csv_and_jsonl_round_trip(onnx_model):
    from ctre_edge.model import SparseMLP

    d = onnx_model
    model = SparseMLP.load(d / "m.ctre")
    X = np.load(d / "x.npy")
    labels, proba = model.predict(X).tolist(), model.predict_proba(X)

    r = runner.invoke(app, ["predict", str(d / "m.onnx"), "--data", str(d / "x.npy"), "--format", "csv"])
    assert r.exit_code == 0, r.stderr
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == ["label", *model.classes] and len(rows) == 21
    assert [row[0] for row in rows[1:]] == labels
    np.testing.assert_allclose(np.array([row[1:] for row in rows[1:]], float), proba, atol=1e-5)

    r = runner.invoke(app, ["predict", str(d / "m.onnx"), "--data", str(d / "x.npy"), "--format", "jsonl"])
    assert r.exit_code == 0, r.stderr
    docs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [doc["label"] for doc in docs] == labels
    assert all(list(doc["probabilities"]) == model.classes for doc in docs)
    np.testing.assert_allclose([list(doc["probabilities"].values()) for doc in docs], proba, atol=1e-5)

    r = runner.invoke(app, ["predict", str(d / "m.onnx"), "--data", str(d / "x.npy"), "--format", "csv", "--json"])
    assert r.exit_code == 2 and "--format and --json exclude each other" in r.stderr
    r = runner.invoke(app, ["predict", str(d / "m.onnx"), "--data", str(d / "x.npy"), "--format", "xml"])
    assert r.exit_code == 2
