"""Issue 9: a cache that works, warm-up that makes later runs compile nothing, lean imports."""

import os
import subprocess
import sys
import textwrap

import pytest


def run_py(code, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_after_warmup_a_fresh_train_compiles_nothing(tmp_path):
    cache = tmp_path / "cache"
    cli = [sys.executable, "-m", "ctre_edge.cli", "--cache-dir", str(cache)]
    r = subprocess.run([*cli, "warmup"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "kernels ready" in r.stderr
    for method, similarity in (("set", "exact"), ("ctre-sim", "exact"), ("ctre-seq", "sketch")):
        r = subprocess.run([*cli, "train", "--hidden", "30,30", "--epochs", "2", "--method", method, "--similarity",
                            similarity, "--quiet"],
                           capture_output=True, text=True, env={**os.environ, "NUMBA_DEBUG_CACHE": "1"})
        assert r.returncode == 0, r.stderr
        assert "compiling kernels" not in r.stderr
        # numba reports "[cache] data saved to ..." for every kernel it had to compile
        saved = [line for line in (r.stdout + r.stderr).splitlines() if "data saved" in line]
        assert saved == [], saved[:3]


def test_cache_dir_falls_back_when_unwritable(tmp_path):
    r = run_py("""
        import os
        import ctre_edge
        d = ctre_edge.configure_cache('/proc/not-a-place/numba')
        print(d, os.access(d, os.W_OK), os.environ['NUMBA_CACHE_DIR'] == str(d))
    """)
    path, writable, same = r.stdout.split()
    assert writable == "True" and same == "True" and "not-a-place" not in path


COMMANDS = {
    "help": ["--help"],
    "info": ["info", "{model}"],
    "report": ["report", "{model}"],
    "profiles": ["profiles", "list"],
    "profiles-show": ["profiles", "show", "rpi-zero-2w"],
    "predict": ["predict", "{onnx}", "--data", "{features}"],
    "train": ["train", "--hidden", "20", "--epochs", "1", "--quiet", "--out", "{out}"],
    "plan": ["plan", "--profile", "rpi-zero-2w"],
}
MUST_NOT_IMPORT = {
    "help": ["numba", "onnx", "onnxruntime", "matplotlib", "sklearn"],
    "info": ["numba", "onnx", "onnxruntime"],
    "report": ["numba", "onnx", "onnxruntime", "matplotlib", "sklearn"],
    "profiles": ["numba", "onnx", "onnxruntime"],
    "profiles-show": ["numba", "onnx", "onnxruntime"],
    "predict": ["numba", "onnx", "ctre_edge.train", "ctre_edge.kernels"],
    "train": ["onnx", "onnxruntime", "sklearn"],
    "plan": ["onnx", "onnxruntime", "sklearn"],
}


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    import numpy as np

    from ctre_edge.data import load_data
    from ctre_edge.export import export_onnx
    from ctre_edge.train import TrainConfig, train

    d = tmp_path_factory.mktemp("lean")
    data = load_data("builtin:digits")
    model = train(data, TrainConfig(hidden=(20,), epochs=1)).model
    model.save(d / "m.ctre")
    export_onnx(model, d / "m.onnx")
    np.save(d / "features.npy", data.X[:4])
    return {"model": d / "m.ctre", "onnx": d / "m.onnx", "features": d / "features.npy", "out": d / "new.ctre"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_import_only_what_they_need(name, artefacts):
    args = [a.format(**artefacts) for a in COMMANDS[name]]
    r = run_py(f"""
        import sys
        from ctre_edge.cli import app
        try:
            app({args!r}, standalone_mode=False)
        except SystemExit as e:
            assert not e.code, e.code
        print("IMPORTED:" + ",".join(sorted(m for m in sys.modules if m in {MUST_NOT_IMPORT[name]!r})))
    """)
    assert r.returncode == 0, r.stderr
    imported = [line for line in r.stdout.splitlines() if line.startswith("IMPORTED:")][-1][len("IMPORTED:"):]
    assert imported == "", f"{name} imported {imported}"
