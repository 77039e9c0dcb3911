"""The training loop: configuration, packed network state, epochs, best-validation snapshot.

One epoch is one call into ``kernels.train_batches`` over a shuffled index array (the data is never
copied or reordered), then a validation pass, then the topology update of the chosen policy
(``evolve.py``). All buffers are allocated once per run; nothing is allocated per batch.

References
----------
ALGORITHM.md, "Training"; scikit-learn's ``_fit_stochastic`` for the loop's shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from .data import SCALINGS, Dataset, fit_scaling, stratified_split
from .errors import ConfigError, CtreError, DivergedError
from .fileio import fault_point
from .layers import INITS, LINEAR_GAIN, RELU_GAIN, SparseLayer, erdos_renyi_layer
from .model import SparseMLP, pack_layers

METHODS = ("static", "set", "ctre-sim", "ctre-seq")
SIMILARITIES = ("exact", "sketch")


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults follow the paper where it has one.

    ``lr_drop_epoch`` None keeps the learning rate constant; otherwise lr is divided by 3 at that
    epoch and by 9 twenty epochs later. ``similarity_samples`` is the S of the cosine scoring.
    ``early_stop`` N ends the run after N epochs without a strictly better validation accuracy
    (0: run all ``epochs``); for ctre-seq the count starts again when growth switches to random.
    ``init`` is ``layers.INITS``: "sparse" (per-neuron fan-in) or "dense-glorot" (the paper's).
    """

    hidden: tuple = (1000, 1000, 1000)
    method: str = "ctre-sim"
    epsilon: float = 1.0
    init: str = "sparse"
    zeta: float = 0.2
    epochs: int = 300
    early_stop: int = 30
    batch_size: int = 100
    lr: float = 0.05
    momentum: float = 0.9
    l2: float = 1e-4
    lr_drop_epoch: int | None = None
    seed: int = 0
    scaling: str = "auto"
    validation_fraction: float = 0.1
    test_fraction: float = 0.2
    patience: int = 40
    similarity: str = "exact"
    similarity_samples: int = 1000
    similarity_workspace_mib: int = 32
    sketch_dim: int = 256
    eval_batch_size: int = 1000

    def validate(self) -> "TrainConfig":
        """Check every field; raise ConfigError naming the argument, the allowed range and the value."""
        hidden = tuple(self.hidden)
        if not hidden or not all(isinstance(h, (int, np.integer)) and not isinstance(h, bool) and h >= 1
                                 for h in hidden):
            raise ConfigError(f"'hidden' must be a non-empty list of positive ints, e.g. 1000,1000,1000; got {self.hidden!r}")
        self.hidden = tuple(int(h) for h in hidden)
        for name, kind, lo, hi in _RANGES:
            value = getattr(self, name)
            if value is None and name == "lr_drop_epoch":
                continue
            ok_type = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) if kind is int \
                else isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
            if not ok_type or not (lo <= value <= hi) or (kind is float and not math.isfinite(value)):
                raise ConfigError(f"'{name}' must be {'an int' if kind is int else 'a number'} in "
                                  f"[{lo}, {hi}]; got {value!r}")
        for name, choices in (("method", METHODS), ("scaling", SCALINGS), ("similarity", SIMILARITIES),
                              ("init", INITS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"'{name}' must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if k == "hidden" else v) for k, v in d.items() if k in known})


_RANGES = [  # (field, type, low, high): one table, one message format
    ("epsilon", float, 1e-9, 1e9),
    ("zeta", float, 0.0, 1.0),
    ("epochs", int, 1, 10**7),
    ("early_stop", int, 0, 10**7),
    ("batch_size", int, 1, 10**7),
    ("lr", float, 0.0, 1e6),
    ("momentum", float, 0.0, 1.0),
    ("l2", float, 0.0, 1e6),
    ("lr_drop_epoch", int, 0, 10**7),
    ("seed", int, 0, 2**63 - 1),
    ("validation_fraction", float, 1e-9, 0.9),
    ("test_fraction", float, 0.0, 0.9),
    ("patience", int, 1, 10**7),
    ("similarity_samples", int, 1, 10**9),
    ("similarity_workspace_mib", int, 1, 10**6),
    ("sketch_dim", int, 1, 65536),
    ("eval_batch_size", int, 1, 10**7),
]


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr until ``lr_drop_epoch``, lr/3 for the next 20 epochs, lr/9 after (ALGORITHM.md)."""
    if config.lr_drop_epoch is None or epoch < config.lr_drop_epoch:
        return config.lr
    return config.lr / 3 if epoch < config.lr_drop_epoch + 20 else config.lr / 9


class PackedNet:
    """Training state: the network packed into flat arrays (see ``kernels.py``) plus momentum.

    ``layer(l)`` returns a SparseLayer of views into the packed arrays, so a topology update
    writes straight into them. A layer's connection count never changes, so offsets are fixed.
    """

    def __init__(self, layers: list[SparseLayer]):
        p = pack_layers(layers)
        self.sizes, self.ptr_off, self.nz_off, self.unit_off = p["sizes"], p["ptr_off"], p["nz_off"], p["unit_off"]
        self.indptr, self.indices, self.values, self.bias = p["indptr"], p["indices"], p["values"], p["bias"]
        self.velocity = np.zeros_like(self.values)
        self.bias_velocity = np.zeros_like(self.bias)

    @property
    def n_layers(self) -> int:
        return self.sizes.shape[0] - 1

    def layer(self, l: int) -> SparseLayer:
        p, z, u = slice(self.ptr_off[l], self.ptr_off[l + 1]), slice(self.nz_off[l], self.nz_off[l + 1]), \
            slice(self.unit_off[l], self.unit_off[l + 1])
        return SparseLayer(int(self.sizes[l]), int(self.sizes[l + 1]), self.indptr[p], self.indices[z],
                           self.values[z], self.bias[u])

    def layer_velocity(self, l: int) -> np.ndarray:
        return self.velocity[self.nz_off[l]:self.nz_off[l + 1]]

    def kernel_args(self) -> tuple:
        return (self.sizes, self.ptr_off, self.nz_off, self.unit_off, self.indptr, self.indices, self.values)

    def snapshot(self) -> list[SparseLayer]:
        """Copies of the current layers (indices too: the topology moves every epoch)."""
        return [SparseLayer(*(a.copy() if isinstance(a, np.ndarray) else a for a in self.layer(l)))
                for l in range(self.n_layers)]


@dataclass
class EpochStats:
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
class TrainResult:
    model: SparseMLP
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    test_accuracy: float | None = None
    warnings: list[str] = field(default_factory=list)


def split_data(data: Dataset, config: TrainConfig, rng_split: np.random.Generator):
    """(train rows, validation rows, X_test, y_test): the test part comes from the file or a split."""
    if data.X_test is not None or config.test_fraction == 0:
        rest = np.arange(data.X.shape[0])
        X_test, y_test = data.X_test, data.y_test
    else:
        rest, test = stratified_split(data.y, config.test_fraction, rng_split, "test")
        X_test, y_test = data.X[test], data.y[test]
    train_sub, val_sub = stratified_split(data.y[rest], config.validation_fraction, rng_split, "validation")
    return rest[train_sub], rest[val_sub], X_test, y_test


def init_layers(sizes: list[int], epsilon: float, rng: np.random.Generator, init: str = "sparse") -> list[SparseLayer]:
    """Erdos-Renyi layers; with ``init="sparse"`` hidden layers use the ReLU gain, the output layer the linear one."""
    last = len(sizes) - 2
    return [erdos_renyi_layer(sizes[l], sizes[l + 1], epsilon, rng, init, LINEAR_GAIN if l == last else RELU_GAIN)
            for l in range(len(sizes) - 1)]


@dataclass
class Checkpointing:
    """Where and how often ``train`` saves its state; ``resume`` continues from the newest checkpoint."""

    directory: Path
    every: int = 1
    resume: bool = False
    force: bool = False


class Interrupted(CtreError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


BATCHES_PER_CALL = 32  # Python regains control this often within an epoch (signals, second Ctrl-C)


def train(data: Dataset, config: TrainConfig, progress: Callable[[EpochStats], None] | None = None, *,
          checkpointing: Checkpointing | None = None, stop_requested: Callable[[], int] | None = None,
          warn: Callable[[str], None] = lambda message: None, start_from: SparseMLP | None = None) -> TrainResult:
    """Train a sparse MLP on ``data``; returns the best-validation model and the per-epoch history.

    With ``checkpointing``, the full state is saved every ``every`` epochs (and at the last one),
    and ``resume`` continues from the newest valid checkpoint, giving the same model bit for bit
    as an uninterrupted run. ``stop_requested()`` returning a signal number ends the run after the
    epoch in progress, with a checkpoint, by raising ``Interrupted``. ``start_from`` continues
    training a given model (its layers and input scaling replace the Erdos-Renyi init and the
    scaling fit; momentum starts at zero), as a fleet client does each round.
    """
    import numba

    from . import checkpoint as ckpt
    from . import kernels
    from .evolve import TopologyPolicy

    config.validate()
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    rng_split, rng_init, rng_shuffle, rng_evolve = (np.random.default_rng(s) for s in seeds)
    train_rows, val_rows, X_test, y_test = split_data(data, config, rng_split)
    sizes = [data.n_features, *config.hidden, len(data.classes)]
    classes = list(data.classes)
    if start_from is not None:
        if checkpointing is not None and checkpointing.resume:
            raise ConfigError("start_from and resume exclude each other: a resumed run continues its checkpoint")
        if start_from.sizes != sizes or [str(c) for c in start_from.classes] != [str(c) for c in classes]:
            raise ConfigError(f"start_from has layer sizes {start_from.sizes} and classes {start_from.classes}; "
                              f"this data and config need {sizes} and {classes}")
        shift, scale = start_from.shift, start_from.scale
    else:
        shift, scale = fit_scaling(data.X, train_rows, config.scaling)

    history: list[EpochStats] = []
    start = 0
    if checkpointing is not None:
        ckpt.prepare_directory(checkpointing.directory, resume=checkpointing.resume, force=checkpointing.force)
        data_print = ckpt.data_fingerprint(data)
    if checkpointing is not None and checkpointing.resume:
        arrays, meta, path = ckpt.load_latest(checkpointing.directory, config.to_dict(), data_print, warn)
        net = PackedNet(SparseMLP.from_arrays(arrays, sizes, classes).layers)
        net.velocity[:] = arrays["velocity"]
        net.bias_velocity[:] = arrays["bias_velocity"]
        best = SparseMLP.from_arrays(arrays, sizes, classes, prefix="best.")
        best_layers, best_acc, best_epoch = best.layers, meta["best_acc"], meta["best_epoch"]
        ckpt.set_rng_state(rng_shuffle, meta["rng_shuffle"])
        ckpt.set_rng_state(rng_evolve, meta["rng_evolve"])
        history = [EpochStats(**h) for h in meta["history"]]
        start = int(meta["epoch"])
        policy = TopologyPolicy(config, data.X, train_rows, shift, scale)
        policy.restore(meta["policy"])
    else:
        net = PackedNet(start_from.layers if start_from is not None
                        else init_layers(sizes, config.epsilon, rng_init, config.init))
        policy = TopologyPolicy(config, data.X, train_rows, shift, scale)
        best_acc, best_epoch, best_layers = -1.0, 0, net.snapshot()

    bs = min(config.batch_size, train_rows.shape[0])
    max_nnz = int(np.diff(net.nz_off).max())
    act = np.empty(int(net.sizes.sum()) * bs, np.float32)
    delta_a = np.empty(int(net.sizes.max()) * bs, np.float32)
    delta_b = np.empty_like(delta_a)
    grad = np.empty(max_nnz, np.float32)
    bias_grad = np.empty(int(net.sizes[1:].max()), np.float32)
    evaluator = Evaluator(net, shift, scale, config.eval_batch_size)
    threads = numba.get_num_threads()  # set from the device profile; any count gives the same model

    n_classes = len(classes)
    majority = float(np.bincount(data.y[val_rows], minlength=n_classes).max() / max(1, val_rows.shape[0]))
    warnings = [m for m in (not_learning(history[:e], n_classes, majority, config) for e in range(1, len(history) + 1))
                if m][:1]

    def stop_after(done: int) -> bool:
        """Early stop once ``done`` epochs are ``early_stop`` past the best one (ctre-seq: past its switch too)."""
        if not config.early_stop:
            return False
        since = best_epoch
        if config.method == "ctre-seq":
            if policy.switched_at is None:
                return False  # its cosine phase ends by its own patience rule
            since = max(since, policy.switched_at)
        return done - since >= config.early_stop

    for epoch in range(start, config.epochs):
        if stop_after(epoch):  # a resumed run that had already stopped early
            break
        t0 = time.perf_counter()
        lr = learning_rate(config, epoch)
        order = rng_shuffle.permutation(train_rows)
        sgd = (shift, scale, *net.kernel_args(), net.velocity, net.bias, net.bias_velocity, act, delta_a, delta_b,
               grad, bias_grad, np.float32(lr), np.float32(config.momentum), np.float32(config.l2))
        loss, correct = 0.0, 0
        first = 0
        if policy.wants_sketch:
            # Sketch mode: the epoch's first S samples (a uniform sample, the order being shuffled)
            # go one batch at a time, and their forward activations, still in ``act``, feed the
            # sketches: no extra pass over the data. Serial on purpose: these single batches
            # alternate with BLAS calls, and numba's workers still spinning after a parallel
            # region slowed the epoch 2x.
            first = min(order.shape[0], config.similarity_samples)
            for s in range(0, first, bs):
                rows = order[s:min(s + bs, first)]
                part_loss, part_correct = kernels.train_batches(data.X, data.y, rows, bs, *sgd, 1)
                loss += part_loss
                correct += part_correct
                policy.observe(level_views(act, net.sizes, rows.shape[0]), rows, epoch)
        step = BATCHES_PER_CALL * bs
        for s in range(first, order.shape[0], step):
            part_loss, part_correct = kernels.train_batches(data.X, data.y, order[s:s + step], bs, *sgd, threads)
            loss += part_loss
            correct += part_correct
        loss /= order.shape[0]
        if not math.isfinite(loss):
            last = f"; the last good checkpoint is in {checkpointing.directory}" if checkpointing else ""
            raise DivergedError(f"training diverged at epoch {epoch + 1} (loss is {loss}); "
                                f"try a lower learning rate than --lr {config.lr:g}{last}")
        val_acc = evaluator.accuracy(data.X, val_rows, data.y)
        if val_acc > best_acc:
            best_acc, best_epoch, best_layers = val_acc, epoch + 1, net.snapshot()
        stats = EpochStats(epoch + 1, float(loss), correct / order.shape[0], val_acc, 0.0, lr)
        ending = epoch + 1 == config.epochs or stop_after(epoch + 1)
        if not ending:  # an update after the last epoch would only add untrained weights
            t1 = time.perf_counter()
            fault_point("update")
            changed = policy.update(net, epoch, val_acc, rng_evolve)
            stats.changed, stats.grown_cosine, stats.grown_random = changed
            stats.update_seconds = time.perf_counter() - t1
        stats.seconds = time.perf_counter() - t0
        history.append(stats)
        message = None if warnings else not_learning(history, n_classes, majority, config)
        if message:
            warnings.append(message)
            warn(message)
        signal_number = stop_requested() if stop_requested is not None else 0
        if checkpointing is not None and (signal_number or (epoch + 1) % checkpointing.every == 0
                                          or ending):
            arrays = SparseMLP(net.snapshot(), shift, scale, classes).arrays()
            arrays.update(velocity=net.velocity, bias_velocity=net.bias_velocity)
            arrays.update({"best." + k: v for k, v in SparseMLP(best_layers, shift, scale, classes).arrays().items()})
            meta = {"config": config.to_dict(), "data": data_print, "best_acc": best_acc, "best_epoch": best_epoch,
                    "rng_shuffle": ckpt.rng_state(rng_shuffle), "rng_evolve": ckpt.rng_state(rng_evolve),
                    "policy": policy.state(), "history": [asdict(h) for h in history]}
            ckpt.save(checkpointing.directory, epoch + 1, arrays, meta)
        if progress is not None:
            progress(stats)
        if signal_number:
            where = f"; checkpoint written to {checkpointing.directory}" if checkpointing else " (no checkpoint)"
            raise Interrupted(f"stopped after epoch {epoch + 1} of {config.epochs}{where}", 128 + signal_number)
        if ending:
            break

    del evaluator, act, delta_a, delta_b, grad, net  # the test pass below allocates its own buffers
    model = SparseMLP(best_layers, shift, scale, classes, config.to_dict())
    test_acc = None
    if X_test is not None and X_test.shape[0]:
        test_acc = float(np.mean(np.argmax(model.predict_proba(X_test, config.eval_batch_size), axis=1) == y_test))
    model.metrics = {"test_accuracy": test_acc, "best_epoch": best_epoch, "best_val_accuracy": best_acc,
                     "epochs": config.epochs, "epochs_run": len(history),
                     "stopped_early": len(history) < config.epochs, "train_samples": int(train_rows.shape[0])}
    if warnings:
        model.metrics["warnings"] = warnings
    return TrainResult(model, history, best_epoch, test_acc, warnings)


NOT_LEARNING_EPOCHS = 5  # consecutive epochs at a uniform output or the majority rate before we say so


def not_learning(history: list[EpochStats], n_classes: int, majority: float, config: TrainConfig) -> str | None:
    """A one-line warning when the last epochs show no learning, else None.

    Signs: the training loss within 1% of ln(C), the loss of a uniform output (weights too small
    for the signal to cross the layers), or validation accuracy no better than always predicting
    the most common class.
    """
    if len(history) < NOT_LEARNING_EPOCHS:
        return None
    recent = history[-NOT_LEARNING_EPOCHS:]
    uniform = math.log(n_classes)
    if n_classes > 1 and all(abs(h.loss - uniform) <= 0.01 * uniform for h in recent):
        sign = f"the training loss has stayed at ln({n_classes}) = {uniform:.3f}, a uniform output,"
    elif all(h.val_accuracy <= majority + 1e-9 for h in recent):
        sign = f"validation accuracy has stayed at the majority-class rate ({majority:.3f})"
    else:
        return None
    causes = []
    if config.init == "dense-glorot":
        causes.append(f"weights initialised for a dense layer at epsilon {config.epsilon:g} (use --init sparse)")
    if config.scaling in ("minmax", "none"):
        causes.append(f"input scaling {config.scaling} (try --scaling auto or standard)")
    causes.append(f"the learning rate (--lr {config.lr:g}: try 10x lower if the loss jumps, higher if it is flat)")
    return (f"the network is not learning: {sign} for {NOT_LEARNING_EPOCHS} epochs; likely causes: "
            + "; ".join(causes))




def level_views(act: np.ndarray, sizes: np.ndarray, nb: int) -> list:
    """Per-level (n_l, nb) views of a flat activation buffer laid out as in ``kernels.forward_all``."""
    bounds = np.concatenate([[0], np.cumsum(sizes)]) * nb
    return [act[bounds[l]:bounds[l + 1]].reshape(int(sizes[l]), nb) for l in range(sizes.shape[0])]


class Evaluator:
    """Validation accuracy of the packed network with one preallocated activation buffer."""

    def __init__(self, net: PackedNet, shift, scale, batch_size: int):
        self.net, self.shift, self.scale, self.bs = net, shift, scale, batch_size
        self.act = np.empty(int(net.sizes.sum()) * batch_size, np.float32)

    def accuracy(self, X, rows, y) -> float:
        from . import kernels

        if rows.shape[0] == 0:
            return 0.0
        n = self.net
        proba = np.empty((rows.shape[0], int(n.sizes[-1])), np.float32)
        kernels.predict_batches(X, rows, self.shift, self.scale, *n.kernel_args(), n.bias, self.bs, self.act, proba)
        return float(np.mean(np.argmax(proba, axis=1) == y[rows]))
