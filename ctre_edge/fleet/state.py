"""The server's run state: settings, the global model, the round history, and its checkpoint.

The checkpoint is one model file (``global.ctre`` in the run directory, written atomically each
round) whose metrics carry the round number and the history, and whose extra ``server.*`` arrays
carry the server momentum's velocity, so model, velocity and round can never disagree after a
crash. ``resume`` reloads it and continues with the next round. numpy only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ModelFileError
from ..fileio import read_archive, write_archive
from ..layers import SparseLayer, check_layer
from ..model import FORMAT, FORMAT_VERSION, SparseMLP
from .aggregate import ServerMomentum

CHECKPOINT = "global.ctre"
SETTINGS = "settings.json"


def load_settings(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read fleet settings {path}: {e}") from None


def read_checkpoint(run_dir: Path) -> SparseMLP | None:
    path = Path(run_dir) / CHECKPOINT
    return SparseMLP.load(path) if path.is_file() else None


def read_velocity(run_dir: Path, model: SparseMLP) -> list[SparseLayer] | None:
    """The server momentum's velocity saved with the checkpoint (the model's topology), or None."""
    path = Path(run_dir) / CHECKPOINT
    arrays, _ = read_archive(path, FORMAT, FORMAT_VERSION, "model")
    if "server.layer0.values" not in arrays:
        return None
    try:
        out = []
        for l, layer in enumerate(model.layers):
            v = SparseLayer(layer.n_in, layer.n_out, layer.indptr, layer.indices, arrays[f"server.layer{l}.values"],
                            arrays[f"server.layer{l}.bias"])
            check_layer(v, f"server.layer{l}")
            out.append(v)
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path} has an invalid server velocity: {e}") from None
    return out


def merge_scaling(summaries: list[dict], method: str, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared input scaling from every node's statistics: min/max, or sums for ``standard``.

    ``auto`` is min-max when every node chose it for its data (byte-valued features), else standard.
    """
    if method == "auto":
        chosen = {s["scaling"] for s in summaries}
        method = chosen.pop() if len(chosen) == 1 else "standard"
    if method == "none":
        return np.zeros(n_features, np.float32), np.ones(n_features, np.float32)
    if method == "minmax":
        shift = np.min([s["lo"] for s in summaries], axis=0).astype(np.float64)
        span = np.max([s["hi"] for s in summaries], axis=0).astype(np.float64) - shift
    else:
        n = sum(s["n"] for s in summaries)
        shift = np.sum([s["s1"] for s in summaries], axis=0, dtype=np.float64) / n
        span = np.sqrt(np.maximum(np.sum([s["s2"] for s in summaries], axis=0, dtype=np.float64) / n - shift ** 2, 0))
    scale = np.where(span > 0, 1.0 / np.where(span > 0, span, 1.0), 1.0)
    return shift.astype(np.float32), scale.astype(np.float32)


class RunState:
    def __init__(self, settings: dict):
        self.settings = settings
        self.run_dir = Path(settings["run_dir"])
        self.model: SparseMLP | None = None
        self.round = 0
        self.history: list[dict] = []
        self.failed: list[dict] = []
        self.server = ServerMomentum(settings.get("server_lr", 1.0), settings.get("server_momentum", 0.0))
        if settings.get("resume"):
            model = read_checkpoint(self.run_dir)
            if model is not None:
                self.model = model
                self.round = int(model.metrics["round"])
                self.history = list(model.metrics["history"])
                self.failed = list(model.metrics.get("failed", []))
                self.settings["targets"] = list(model.metrics["targets"])
                self.server.layers = read_velocity(self.run_dir, model)

    @property
    def targets(self) -> list[int]:
        return list(self.settings["targets"])

    def setup(self, summaries: list[dict]) -> None:
        """The initial global model: sizes and classes from the nodes, Erdos-Renyi layers, shared scaling."""
        from ..train import TrainConfig, init_layers

        n_features = {s["n_features"] for s in summaries}
        if len(n_features) != 1:
            raise DataError(f"the clients' data have different feature counts {sorted(n_features)}")
        labels = {c for s in summaries for c in s["classes"]}
        try:
            classes = sorted(labels)
        except TypeError:
            classes = sorted(labels, key=str)
        config = TrainConfig.from_dict(self.settings["train"]).validate()
        sizes = [n_features.pop(), *config.hidden, len(classes)]
        shift, scale = merge_scaling(summaries, config.scaling, sizes[0])
        layers = init_layers(sizes, config.epsilon, np.random.default_rng(config.seed), config.init)
        self.settings["targets"] = [layer.nnz for layer in layers]
        self.model = SparseMLP(layers, shift, scale, classes, config.to_dict())
        self.save()

    def client_settings(self) -> dict:
        s = self.settings
        return {"run_id": s["run_id"], "train": s["train"], "local_epochs": s["local_epochs"], "rule": s["rule"],
                "value_dtype": s["value_dtype"], "classes": list(self.model.classes)}

    def finish_round(self, layers, metrics: list[dict], seconds: float, *, sent: int, missing: int,
                     payload_down: int, started: float = 0.0) -> None:
        self.model.layers = layers
        self.round += 1
        w = np.array([m["samples"] for m in metrics])
        self.history.append({
            "round": self.round, "started": started, "finished": time.time(), "sent": sent, "replies": len(metrics), "missing": missing,
            "seconds": seconds, "samples": int(w.sum()),
            "val_before": float(np.average([m["val_before"] for m in metrics], weights=w)),
            "val_after": float(np.average([m["val_after"] for m in metrics], weights=w)),
            "payload_down": payload_down, "payload_up": int(sum(m["bytes_up"] for m in metrics)),
            "nodes": [int(m["node"]) for m in metrics]})
        self.save()

    def note_failed_round(self, r: int, replies: int, sent: int) -> None:
        self.failed.append({"round": r, "replies": replies, "sent": sent})

    def save(self) -> None:
        m = self.model
        m.metrics = {"round": self.round, "history": self.history, "failed": self.failed,
                     "targets": self.targets, "done": self.round >= self.settings["rounds"]}
        arrays = m.arrays()
        for l, v in enumerate(self.server.layers or []):
            arrays[f"server.layer{l}.values"], arrays[f"server.layer{l}.bias"] = v.values, v.bias
        # As SparseMLP.save, plus the velocity: one atomic file, readable as a normal model.
        from .. import __version__
        from ..model import _jsonable

        meta = {"ctre_edge_version": __version__, "sizes": m.sizes, "config": m.config,
                "classes": [_jsonable(c) for c in m.classes], "metrics": m.metrics}
        write_archive(self.run_dir / CHECKPOINT, FORMAT, FORMAT_VERSION, arrays, meta, force=True)

    def finish(self) -> None:
        self.save()
