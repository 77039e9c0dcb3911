"""Issue 7: checkpoints, resume, and faults that lose nothing. Real subprocesses where it matters."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ctre_edge import checkpoint as ckpt
from ctre_edge.data import load_data
from ctre_edge.errors import ConfigError, ModelFileError, OutputExistsError, OutputWriteError
from ctre_edge.train import Checkpointing, TrainConfig, train

RUN = ["--data", "builtin:digits", "--hidden", "48,48", "--epsilon", "4", "--epochs", "8", "--quiet",
       "--similarity-samples", "300"]


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "ctre_edge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


@pytest.fixture(scope="module")
def digits():
    return load_data("builtin:digits")


def config(**kw):
    return TrainConfig(**{**dict(hidden=(48, 48), epsilon=4, epochs=6, similarity_samples=300), **kw})


@pytest.mark.parametrize("method, similarity", [("set", "exact"), ("ctre-sim", "exact"), ("ctre-seq", "exact"),
                                                ("ctre-sim", "sketch")])
def test_resume_in_process_is_bit_identical(digits, tmp_path, method, similarity):
    def config_(**kw):
        return config(method=method, patience=2, similarity=similarity, sketch_dim=32, **kw)

    whole = train(digits, config_()).model.save(tmp_path / "whole.ctre")

    class Stop:  # ask for a stop after epoch 3, as a signal handler would
        def __init__(self):
            self.epochs = 0

        def __call__(self):
            return signal.SIGINT if self.epochs >= 3 else 0

    stop = Stop()
    d = tmp_path / "ck"
    with pytest.raises(Exception) as e:
        train(digits, config_(), progress=lambda s: setattr(stop, "epochs", s.epoch),
              checkpointing=Checkpointing(d), stop_requested=stop)
    assert e.value.exit_code == 130 and "after epoch 4" in str(e.value)  # asked during epoch 4
    assert [n for n, _ in ckpt.checkpoint_files(d)] == [4, 3]  # the newest two are kept
    resumed = train(digits, config_(), checkpointing=Checkpointing(d, resume=True))
    assert resumed.model.save(tmp_path / "resumed.ctre").read_bytes() == whole.read_bytes()
    assert [h.epoch for h in resumed.history] == list(range(1, 7))


def test_resume_refuses_other_settings_or_data(digits, tmp_path):
    d = tmp_path / "ck"
    train(digits, config(epochs=2), checkpointing=Checkpointing(d))
    with pytest.raises(ConfigError, match="other settings: lr"):
        train(digits, config(epochs=2, lr=0.5), checkpointing=Checkpointing(d, resume=True))
    other = load_data("builtin:digits")
    other.X = other.X.copy()
    other.X[0, 0] ^= 1
    with pytest.raises(ConfigError, match="different data set"):
        train(other, config(epochs=2), checkpointing=Checkpointing(d, resume=True))
    with pytest.raises(OutputExistsError, match="--resume"):
        train(digits, config(epochs=2), checkpointing=Checkpointing(d))


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_damaged_checkpoint_is_skipped_never_loaded(digits, tmp_path, damage):
    d = tmp_path / "ck"
    train(digits, config(epochs=3), checkpointing=Checkpointing(d))
    newest = ckpt.checkpoint_files(d)[0][1]
    data = bytearray(newest.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 2]
    newest.write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        ckpt.read_archive(newest, ckpt.FORMAT, ckpt.FORMAT_VERSION)
    warnings = []
    arrays, meta, path = ckpt.load_latest(d, config(epochs=3).validate().to_dict(), ckpt.data_fingerprint(digits),
                                          warnings.append)
    assert meta["epoch"] == 2 and path != newest and "skipping" in warnings[0]


def test_every_byte_flip_of_a_checkpoint_is_caught(digits, tmp_path):
    d = tmp_path / "ck"
    train(digits, config(epochs=1, hidden=(8,)), checkpointing=Checkpointing(d))
    path = ckpt.checkpoint_files(d)[0][1]
    good = path.read_bytes()
    arrays, _ = ckpt.read_archive(path, ckpt.FORMAT, ckpt.FORMAT_VERSION)
    for pos in range(0, len(good), max(1, len(good) // 400)):
        bad = bytearray(good)
        bad[pos] ^= 0x04
        path.write_bytes(bytes(bad))
        try:
            got, _ = ckpt.read_archive(path, ckpt.FORMAT, ckpt.FORMAT_VERSION)
        except ModelFileError:
            continue
        for k in arrays:  # a flip that leaves the archive readable must leave every array intact
            np.testing.assert_array_equal(got[k], arrays[k])


def test_full_disk_keeps_previous_checkpoint(digits, tmp_path, monkeypatch):
    d = tmp_path / "ck"
    import ctre_edge.fileio as fileio

    real = fileio.os.fsync
    calls = {"n": 0}

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] > 4:  # epochs 1 and 2 succeed (file + directory each), then the disk is full
            raise OSError(28, "No space left on device")
        return real(fd)

    monkeypatch.setattr(fileio.os, "fsync", fsync)
    with pytest.raises(OutputWriteError, match="no space left on device"):
        train(digits, config(epochs=4), checkpointing=Checkpointing(d))
    monkeypatch.undo()
    assert [n for n, _ in ckpt.checkpoint_files(d)] == [2, 1]
    assert not list(d.glob(".*.tmp"))
    ckpt.read_archive(d / "epoch-000002.ckpt", ckpt.FORMAT, ckpt.FORMAT_VERSION)


def test_divergence_leaves_a_usable_checkpoint(tmp_path):
    r = cli("train", *RUN, "--lr", "1e5", "--scaling", "none", "--checkpoint-dir", str(tmp_path / "ck"))
    assert r.returncode == 7 and "diverged at epoch" in r.stderr and "lower learning rate" in r.stderr
    assert "Traceback" not in r.stderr


def test_nan_in_data_is_refused_clearly(tmp_path):
    d = load_data("builtin:digits")
    X = d.X.astype(np.float32)
    X[5, 3] = np.nan
    np.savez(tmp_path / "nan.npz", X=X, y=np.asarray(d.y))
    r = cli("train", *RUN[2:], "--data", str(tmp_path / "nan.npz"))
    assert r.returncode == 4 and "NaN" in r.stderr and "Traceback" not in r.stderr


def test_read_only_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions")
        r = cli("train", *RUN, "--out", str(ro / "m.ctre"))
        assert r.returncode == 6 and "Traceback" not in r.stderr
    finally:
        ro.chmod(0o755)


def _final_model(tmp_path, name, extra_env=None, kill_after=None, epochs=8):
    """Run to completion, resuming after every kill; returns the model bytes and how many kills it took.

    ``kill_after(attempt, ck)`` waits (e.g. for a checkpoint of some epoch to appear) and returns,
    then the process is killed with SIGKILL, for the first three attempts.
    """
    out = tmp_path / f"{name}.ctre"
    ck = tmp_path / f"{name}.ck"
    args = ["train", *RUN, "--epochs", str(epochs), "--method", "ctre-sim", "--out", str(out)]
    kills = 0
    for attempt in range(12):
        resume = ["--resume", str(ck)] if ckpt.checkpoint_files(ck) else ["--checkpoint-dir", str(ck)]
        env = extra_env(attempt) if extra_env else None
        proc = subprocess.Popen([sys.executable, "-m", "ctre_edge.cli", *args, *resume], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, **(env or {})})
        if kill_after is not None and attempt < 3:
            kill_after(attempt, ck)
            proc.kill()
        _, stderr = proc.communicate()
        if proc.returncode == 0:
            return out.read_bytes(), kills
        assert proc.returncode == -signal.SIGKILL, stderr
        kills += 1
    raise AssertionError("did not finish")


@pytest.mark.slow
def test_sigkill_at_random_times_and_places_then_resume_is_bit_identical(tmp_path):
    reference, _ = _final_model(tmp_path, "reference")
    # Kills at exact places: inside a checkpoint write (after the temp file, before the rename) and
    # during a topology update; then at random wall-clock times.
    places = ["write:3", "update:2", "write:1", "update:4"]
    exact, kills = _final_model(tmp_path, "exact",
                                extra_env=lambda a: {"CTRE_EDGE_KILL_AT": places[a]} if a < len(places) else {})
    assert kills == len(places) and exact == reference
    reference40, _ = _final_model(tmp_path, "reference40", epochs=40)
    rng = np.random.default_rng(7)

    def at_random_time(attempt, ck):
        # wait for a random epoch's checkpoint, then a random fraction of an epoch more
        target = int(rng.integers(2 + 10 * attempt, 10 + 10 * attempt))
        deadline = time.time() + 60
        while not any(e >= target for e, _ in ckpt.checkpoint_files(ck)) and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.01)))

    timed, kills = _final_model(tmp_path, "timed", kill_after=at_random_time, epochs=40)
    assert kills == 3 and timed == reference40


@pytest.mark.slow
def test_sigint_and_sigterm_checkpoint_and_print_how_to_resume(tmp_path):
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        ck = tmp_path / f"ck{code}"
        args = ["train", *RUN[:-2], "--epochs", "400", "--quiet", "--checkpoint-dir", str(ck)]
        proc = subprocess.Popen([sys.executable, "-m", "ctre_edge.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not ckpt.checkpoint_files(ck) and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == code, stderr
        assert "--resume" in stderr and "Traceback" not in stderr
        newest = ckpt.checkpoint_files(ck)[0][1]
        ckpt.read_archive(newest, ckpt.FORMAT, ckpt.FORMAT_VERSION)


def test_read_only_filesystem_gives_one_line(tmp_path, monkeypatch):
    """Root ignores directory permissions, so simulate EROFS where the temp file is created."""
    import errno

    import ctre_edge.fileio as fileio
    from ctre_edge.layers import erdos_renyi_layer
    from ctre_edge.model import SparseMLP

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)
    layer = erdos_renyi_layer(3, 2, 1, np.random.default_rng(0))
    model = SparseMLP([layer], np.zeros(3, np.float32), np.ones(3, np.float32), [0, 1])
    with pytest.raises(OutputWriteError, match="read-only or not writable; choose another output path"):
        model.save(tmp_path / "m.ctre")
    assert not (tmp_path / "m.ctre").exists()


def test_resume_auto_restarts_one_command_line_until_done_bit_identical(tmp_path):
    """A service reruns the identical command after every kill, the first ones before any checkpoint."""
    def command(name):
        return ["train", *RUN, "--epochs", "5", "--method", "ctre-sim", "--out", str(tmp_path / f"{name}.ctre"),
                "--resume", "auto"]

    reference = cli(*command("reference"))
    assert reference.returncode == 0, reference.stderr
    # killed inside the first checkpoint write (only a temp file exists), then during the first topology
    # update (before any checkpoint again), then inside the third write (two checkpoints exist)
    places = ["write:1", "update:1", "write:3"]
    for attempt in range(len(places) + 3):
        env = {"CTRE_EDGE_KILL_AT": places[attempt]} if attempt < len(places) else {}
        r = cli(*command("restarted"), env=env)
        if attempt < len(places):
            assert r.returncode == -signal.SIGKILL, r.stderr
            continue
        assert r.returncode == 0, r.stderr
        break
    assert [e for e, _ in ckpt.checkpoint_files(tmp_path / "restarted.ctre.ckpt")] == [5, 4]
    assert (tmp_path / "restarted.ctre").read_bytes() == (tmp_path / "reference.ctre").read_bytes()
    # other settings on those checkpoints are refused as with --resume DIR; the finished model is kept
    (tmp_path / "restarted.ctre").rename(tmp_path / "done.ctre")
    r = cli(*command("restarted"), "--lr", "0.1")
    assert r.returncode == 2 and "other settings: lr" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "done.ctre").read_bytes() == (tmp_path / "reference.ctre").read_bytes()


def test_resume_auto_starts_fresh_past_corrupt_checkpoints(digits, tmp_path):
    d = tmp_path / "ck"
    whole = train(digits, config(epochs=3)).model.save(tmp_path / "whole.ctre")
    d.mkdir()
    (d / "epoch-000009.ckpt").write_bytes(b"not a checkpoint")
    warnings = []
    auto = train(digits, config(epochs=3), checkpointing=Checkpointing(d, auto=True), warn=warnings.append)
    assert auto.model.save(tmp_path / "auto.ctre").read_bytes() == whole.read_bytes()
    assert (d / "epoch-000009.ckpt.corrupt").read_bytes() == b"not a checkpoint"  # kept, set aside
    assert [e for e, _ in ckpt.checkpoint_files(d)] == [3, 2] and "starting a fresh run" in warnings[-1]
    resumed = train(digits, config(epochs=3), checkpointing=Checkpointing(d, auto=True))  # resumes at epoch 3
    assert resumed.model.save(tmp_path / "resumed.ctre").read_bytes() == whole.read_bytes()


def _digits_csv(path):
    d = load_data("builtin:digits")
    np.savetxt(path, np.column_stack([d.X, d.y]), fmt="%d", delimiter=",")
    return path


def test_read_only_data_directory_trains(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    data = _digits_csv(ro / "d.csv")
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that ignores directory permissions (root); "
                        "test_unwritable_cache_locations_train covers it without them")
        for extra in ([], ["--cache-beside"]):
            r = cli("train", *RUN[2:], "--epochs", "2", "--data", str(data), *extra)
            assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert sorted(os.listdir(ro)) == ["d.csv"]
    finally:
        ro.chmod(0o755)


def test_unwritable_cache_locations_train(tmp_path):
    """No permissions needed: the beside directory and the user cache are paths mkdir cannot create."""
    data = _digits_csv(tmp_path / "d.csv")
    (tmp_path / "d.csv.ctre-cache").write_text("a file, not a directory")
    (tmp_path / "cache-file").write_text("")
    r = cli("train", *RUN[2:], "--epochs", "2", "--data", str(data), "--cache-beside", "--json",
            env={"XDG_CACHE_HOME": str(tmp_path / "cache-file")})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(r.stdout)["epochs"] == 2
