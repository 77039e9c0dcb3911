"""Two processes at once: one kernel cache filled by concurrent cold runs, one --out wanted by two runs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from ctre_edge import checkpoint as ckpt
from ctre_edge.errors import OutputWriteError
from ctre_edge.fileio import FileLock, Locked, lock_output, lock_path
from ctre_edge.model import SparseMLP

TRAIN = ["train", "--hidden", "40,40", "--epsilon", "4", "--epochs", "3", "--similarity-samples", "200", "--quiet"]


def popen(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "ctre_edge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_file_lock_refuses_a_second_holder_and_frees_on_exit(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path) as first:
        assert first.held
        with pytest.raises(Locked) as e:
            with FileLock(path, wait=False):
                pass
        assert e.value.pid == os.getpid()
    with FileLock(path, wait=False) as again:  # released with the block
        assert again.held
    with FileLock(tmp_path / "no-such-dir" / "x.lock") as fallback:  # cannot create: no lock, no error
        assert not fallback.held


def test_lock_output_names_the_holder(tmp_path):
    out = tmp_path / "m.ctre"
    with lock_output(out):
        with pytest.raises(OutputWriteError, match=rf"another ctre-edge run \(pid {os.getpid()}\) is writing it"):
            with lock_output(out):
                pass
        assert lock_path(out).exists()
    assert not lock_path(out).exists() and not out.exists()  # nothing left behind


def test_second_train_on_an_out_in_use_exits_6_and_the_first_finishes(tmp_path):
    out = tmp_path / "m.ctre"
    out.write_bytes(b"an earlier model the first run replaces with --force")
    first = popen(*TRAIN, "--epochs", "6", "--out", str(out), "--force")
    deadline = time.time() + 120
    while not ckpt.checkpoint_files(tmp_path / "m.ctre.ckpt") and time.time() < deadline:
        time.sleep(0.02)
    first.send_signal(signal.SIGSTOP)  # hold it mid-run, lock taken, so the second surely collides
    try:
        for extra in ([], ["--force"], ["--resume", "auto"]):
            second = subprocess.run([sys.executable, "-m", "ctre_edge.cli", *TRAIN, "--out", str(out), *extra],
                                    capture_output=True, text=True, timeout=120)
            lines = second.stderr.strip().splitlines()
            assert second.returncode == 6, second.stderr
            assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and "Traceback" not in second.stderr
            assert second.stdout == ""
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    model = SparseMLP.load(out)  # the first run's model, whole
    assert model.metrics["epochs_run"] == 6


@pytest.mark.slow
def test_two_cold_cache_runs_at_once_compile_once_and_match_serial(tmp_path):
    cache = str(tmp_path / "kernels")
    env = {"NUMBA_DEBUG_CACHE": "1"}
    runs = [popen("--cache-dir", cache, *TRAIN, "--method", m, "--out", str(tmp_path / f"{i}.ctre"), env=env)
            for i, m in enumerate(["ctre-sim", "ctre-sim"])]
    outputs = [r.communicate(timeout=600) for r in runs]
    for r, (stdout, stderr) in zip(runs, outputs):
        assert r.returncode == 0, stderr[-2000:]
    # numba prints "[cache] data saved to ..." for each kernel it compiles: only one process compiled
    compiled = [any("data saved" in line for line in (o + e).splitlines()) for o, e in outputs]
    assert compiled.count(True) == 1, compiled
    serial = popen("--cache-dir", cache, *TRAIN, "--method", "ctre-sim", "--out", str(tmp_path / "serial.ctre"),
                   env=env)
    stdout, stderr = serial.communicate(timeout=600)
    assert serial.returncode == 0 and "data saved" not in stdout + stderr, stderr[-2000:]
    reference = (tmp_path / "serial.ctre").read_bytes()
    assert (tmp_path / "0.ctre").read_bytes() == reference == (tmp_path / "1.ctre").read_bytes()
