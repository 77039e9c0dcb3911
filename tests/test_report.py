"""`ctre-edge report` and `info --features --png`: the figure, its terminal twin, and the saved history (issue 17)."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ctre_edge import report
from ctre_edge.cli import app
from ctre_edge.model import SparseMLP

runner = CliRunner()
EPOCHS = 6


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "m.ctre"
    r = run("train", "--hidden", "32,32", "--epsilon", "4", "--epochs", EPOCHS, "--early-stop", "0", "--quiet",
            "--no-checkpoint", "--out", path)
    assert r.exit_code == 0, r.stderr
    return path


def read_png(path):
    plt = pytest.importorskip("matplotlib.pyplot")
    return plt.imread(path)


def test_the_model_keeps_its_history(model_path):
    model = SparseMLP.load(model_path)
    hist = model.metrics["epoch_history"]
    assert hist["epoch"] == list(range(1, EPOCHS + 1))
    assert max(hist["val_accuracy"]) == model.metrics["best_val_accuracy"]
    assert all(c + r == n for c, r, n in zip(hist["grown_cosine"], hist["grown_random"], hist["changed"]))
    assert sum(hist["grown_cosine"]) > 0 and hist["changed"][-1] == 0  # no update after the last epoch


def test_report_png_is_an_image_of_the_expected_size(model_path, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report.png"
    r = run("report", model_path, "--out", out)
    assert r.exit_code == 0, r.stderr
    image = read_png(out)
    width, height = (int(v * report.DPI) for v in report.FIGSIZE)
    assert out.stat().st_size > 10_000 and image.shape[:2] == (height, width)
    assert np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0] > 1
    r = run("report", model_path, "--out", out)
    assert r.exit_code == 6 and "--force" in r.stderr
    page = tmp_path / "report.html"
    assert run("report", model_path, "--out", page).exit_code == 0
    text = page.read_text()
    assert "data:image/png;base64," in text and "best epoch" in text and "<table" in text


def test_report_json_and_terminal_summary_say_the_same(model_path):
    r = run("report", model_path, "--json")
    assert r.exit_code == 0, r.stderr
    facts = json.loads(r.stdout)
    model = SparseMLP.load(model_path)
    assert facts["grown"]["cosine"] == sum(model.metrics["epoch_history"]["grown_cosine"])
    assert [row["nnz"] for row in facts["layers"]] == model.nnz
    assert sum(facts["layers"][0]["in_degree_counts"]) == 32 and facts["inputs"]["image_shape"] == [8, 8]
    r = run("report", model_path)
    assert r.exit_code == 0 and r.stdout == ""
    for text in (f"best epoch {facts['metrics']['best_epoch']} of {EPOCHS} run", "grown by cosine",
                 "in-degree per neuron", f"grown: {facts['grown']['cosine']:,} by cosine", "\u2580"):
        assert text in r.stderr, text


def test_without_matplotlib_the_report_says_how_to_install_it(model_path, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    r = run("report", model_path, "--out", tmp_path / "r.png")
    assert r.exit_code == 2 and not (tmp_path / "r.png").exists()
    assert "pip install 'ctre-edge[plot]'" in r.stderr.strip().splitlines()[-1]
    assert "in-degree per neuron" in r.stderr  # the same facts, in the terminal
    assert run("report", model_path, "--out", tmp_path / "r.svg").exit_code == 2


def test_a_model_saved_without_history_still_reports(model_path, tmp_path):
    model = SparseMLP.load(model_path)
    del model.metrics["epoch_history"]
    model.save(tmp_path / "old.ctre")
    r = run("report", tmp_path / "old.ctre")
    assert r.exit_code == 0 and "no history saved" in r.stderr
    if report.have_matplotlib():
        assert run("report", tmp_path / "old.ctre", "--out", tmp_path / "old.png").exit_code == 0
        assert read_png(tmp_path / "old.png").shape[:2] == (700, 1200)


def test_info_features_png(model_path, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = tmp_path / "degrees.png"
    r = run("info", model_path, "--features", "--png", out)
    assert r.exit_code == 0, r.stderr
    image = read_png(out)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.unique(image.reshape(-1, image.shape[2]), axis=0).shape[0] > 1
    assert run("info", model_path, "--features", "--png", out).exit_code == 6  # not overwritten
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    r = run("info", model_path, "--features", "--png", tmp_path / "none.png")
    assert r.exit_code == 2 and "needs matplotlib" in r.stderr
