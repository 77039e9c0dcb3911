"""Checkpoints: everything a run needs to continue bit for bit after a crash, power loss or Ctrl-C.

A checkpoint is one archive (``fileio.write_archive``: atomic, checksummed) per saved epoch,
``epoch-000012.ckpt`` in the checkpoint directory; the newest two are kept. It holds the packed
network with its momentum, the best-validation snapshot, the random generators' states, the
topology policy's state, the history, and fingerprints of the configuration and the data, so a
resume with other settings or other data is refused instead of silently producing another model.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import ConfigError, ModelFileError, OutputExistsError, OutputWriteError
from .fileio import array_digest, read_archive, write_archive
from .layers import SparseLayer
from .model import SparseMLP
from .packed import PackedNet

FORMAT = "ctre-edge-checkpoint"
FORMAT_VERSION = 1
KEEP = 2
_NAME = re.compile(r"^epoch-(\d{6,})\.ckpt$")


@dataclass
class Checkpointing:
    """Where and how often ``train`` saves its state; ``resume`` continues from the newest checkpoint.

    ``auto`` (``--resume auto``) resumes when the directory holds a valid checkpoint and otherwise
    starts fresh with the same settings, so a service can rerun one command line after any stop.
    """

    directory: Path
    every: int = 1
    resume: bool = False
    force: bool = False
    auto: bool = False


@dataclass
class EpochStats:
    """What one epoch did: loss, accuracies, time, and the topology update's counts."""

    epoch: int
    loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float
    lr: float
    changed: int = 0
    grown_cosine: int = 0
    grown_random: int = 0
    update_seconds: float = 0.0


@dataclass
class TrainState:
    """Everything of a run in progress that a checkpoint keeps, besides the policy's own state.

    ``epoch`` counts the epochs done; ``best_layers`` is the best-validation snapshot so far.
    """

    net: PackedNet
    best_layers: list[SparseLayer]
    rng_shuffle: np.random.Generator
    rng_evolve: np.random.Generator
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[EpochStats] = field(default_factory=list)
    epoch: int = 0

    def record(self, stats: EpochStats) -> None:
        """Append an epoch's stats; snapshot the network when validation strictly improved."""
        if stats.val_accuracy > self.best_acc:
            self.best_acc, self.best_epoch, self.best_layers = stats.val_accuracy, stats.epoch, self.net.snapshot()

    def arrays(self, shift, scale, classes) -> dict:
        """The live network with its momentum and the best snapshot (``best.`` prefix), by name."""
        arrays = SparseMLP(self.net.snapshot(), shift, scale, classes).arrays()
        arrays.update(velocity=self.net.velocity, bias_velocity=self.net.bias_velocity)
        arrays.update({"best." + k: v for k, v in SparseMLP(self.best_layers, shift, scale, classes).arrays().items()})
        return arrays

    def meta(self, config_dict: dict, data_print: str, policy_state: dict) -> dict:
        return {"config": config_dict, "data": data_print, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "rng_shuffle": rng_state(self.rng_shuffle), "rng_evolve": rng_state(self.rng_evolve),
                "policy": policy_state, "history": [asdict(h) for h in self.history]}

    @classmethod
    def restore(cls, arrays: dict, meta: dict, sizes, classes, rng_shuffle, rng_evolve) -> "TrainState":
        """The state saved by ``arrays``/``meta``; the generators given are set to the saved states."""
        net = PackedNet.from_layers(SparseMLP.from_arrays(arrays, sizes, classes).layers)
        net.velocity[:] = arrays["velocity"]
        net.bias_velocity[:] = arrays["bias_velocity"]
        best = SparseMLP.from_arrays(arrays, sizes, classes, prefix="best.")
        set_rng_state(rng_shuffle, meta["rng_shuffle"])
        set_rng_state(rng_evolve, meta["rng_evolve"])
        return cls(net, best.layers, rng_shuffle, rng_evolve, meta["best_acc"], meta["best_epoch"],
                   [EpochStats(**h) for h in meta["history"]], int(meta["epoch"]))


def data_fingerprint(data) -> str:
    arrays = {k: v for k, v in (("X", data.X), ("y", data.y), ("X_test", data.X_test), ("y_test", data.y_test))
              if v is not None}
    return array_digest(arrays) + ":" + ",".join(map(str, data.classes))


def checkpoint_files(directory: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the checkpoints in ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def prepare_directory(directory: Path, *, resume: bool, force: bool) -> None:
    """Create the directory; refuse to start over on another run's checkpoints unless ``force``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create checkpoint directory {directory}: {e.strerror or e}") from None
    for tmp in directory.glob(".epoch-*.tmp"):  # left by a write that was killed
        tmp.unlink(missing_ok=True)
    existing = checkpoint_files(directory)
    if existing and not resume:
        if not force:
            raise OutputExistsError(f"{directory} already holds checkpoints; pass --resume {directory} to continue "
                                    "that run, or --force to start over")
        for _, p in existing:
            p.unlink()


def save(directory: Path, epoch: int, arrays: dict, meta: dict) -> Path:
    """Write ``epoch``'s checkpoint atomically, then delete all but the newest ``KEEP``."""
    path = directory / f"epoch-{epoch:06d}.ckpt"
    write_archive(path, FORMAT, FORMAT_VERSION, arrays, dict(meta, epoch=epoch), force=True)
    for _, old in checkpoint_files(directory)[KEEP:]:
        try:
            old.unlink()
        except OSError:
            pass
    return path


def load_latest(directory: Path, config_dict: dict, data_print: str, warn, *,
                fresh_if_none: bool = False) -> tuple[dict, dict, Path] | None:
    """(arrays, meta, path) of the newest valid checkpoint; corrupt ones are skipped with ``warn``.

    Raises ConfigError when the checkpoint was made with other settings or other data, and
    ModelFileError when no valid checkpoint exists; with ``fresh_if_none`` (``--resume auto``) it
    returns None instead, after renaming the corrupt files to ``*.ckpt.corrupt`` (kept, never loaded
    again, and not mistaken for newer checkpoints than the fresh run's).
    """
    files = checkpoint_files(directory)
    if not files:
        raise ModelFileError(f"no checkpoint found in {directory}; start without --resume")
    for _, path in files:
        try:
            arrays, meta = read_archive(path, FORMAT, FORMAT_VERSION, "checkpoint")
        except ModelFileError as e:
            warn(f"skipping {path.name}: {e}")
            continue
        if meta.get("data") != data_print:
            raise ConfigError(f"{path} was made with a different data set; resume with the same --data, or start "
                              "a new run in another --checkpoint-dir")
        saved = meta.get("config", {})
        diff = sorted(k for k in set(saved) | set(config_dict) if saved.get(k) != config_dict.get(k))
        if diff:
            shown = ", ".join(f"{k} ({saved.get(k)!r} there, {config_dict.get(k)!r} now)" for k in diff[:3])
            raise ConfigError(f"{path} was made with other settings: {shown}; resume with the same options")
        return arrays, meta, path
    if fresh_if_none:
        for _, path in files:
            try:
                path.rename(path.with_name(path.name + ".corrupt"))
            except OSError as e:
                raise OutputWriteError(f"cannot set aside the corrupt checkpoint {path}: {e.strerror or e}") from None
        warn(f"every checkpoint in {directory} is corrupt (renamed to *.ckpt.corrupt); starting a fresh run")
        return None
    raise ModelFileError(f"every checkpoint in {directory} is corrupt; start a new run without --resume")


def rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def set_rng_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state
