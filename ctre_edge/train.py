"""The training loop: epochs, validation, the topology update, the best-validation snapshot.

One epoch is one call into ``kernels.train_batches`` over a shuffled index array (the data is never
copied or reordered), then a validation pass, then the topology update of the chosen policy
(``evolve.py``). All buffers are allocated once per run; nothing is allocated per batch.

References
----------
docs/algorithm.md, "Training"; scikit-learn's ``_fit_stochastic`` for the loop's shape.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numba
import numpy as np

from . import checkpoint as ckpt
from . import kernels
from .checkpoint import Checkpointing, EpochStats, TrainState
from .config import TrainConfig
from .data import Dataset, fit_scaling, stratified_split
from .errors import ConfigError, CtreError, DivergedError
from .evolve import TopologyPolicy
from .fileio import fault_point
from .layers import LINEAR_GAIN, RELU_GAIN, SparseLayer, erdos_renyi_layer
from .model import SparseMLP
from .packed import CSC_MAX_CONNECTIONS, PackedNet, aligned_empty, level_views, no_csc, row_stride
from .similarity import in_threads


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """lr until ``lr_drop_epoch``, lr/3 for the next 20 epochs, lr/9 after (docs/algorithm.md)."""
    if config.lr_drop_epoch is None or epoch < config.lr_drop_epoch:
        return config.lr
    return config.lr / 3 if epoch < config.lr_drop_epoch + 20 else config.lr / 9


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


class Interrupted(CtreError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; ``exit_code`` is 128 + signal."""

    def __init__(self, message: str, exit_code: int = 130):
        super().__init__(message)
        self.exit_code = exit_code


class RowBudget(Protocol):
    """A hook that can shorten an epoch's training or validation part (benchmarks time-box epochs).

    Before each kernel call of a part (``"train"`` or ``"validation"``), ``allow(part, rows,
    remaining)`` says how many of the next ``rows`` to run (``remaining`` rows of the part are left);
    0 ends that part for this epoch. ``spent(part, rows, seconds)`` reports each call's time. Without a
    budget every row runs; with one, a shortened epoch trains on fewer rows (so its model differs).
    """

    def allow(self, part: str, rows: int, remaining: int) -> int: ...

    def spent(self, part: str, rows: int, seconds: float) -> None: ...


BATCHES_PER_CALL = 32  # Python regains control this often within an epoch (signals, second Ctrl-C)


def train(data: Dataset, config: TrainConfig, progress: Callable[[EpochStats], None] | None = None, *,
          checkpointing: Checkpointing | None = None, stop_requested: Callable[[], int] | None = None,
          warn: Callable[[str], None] = lambda message: None, budget: RowBudget | None = None,
          start_from: SparseMLP | None = None, refit_scaling: bool = False) -> TrainResult:
    """Train a sparse MLP on ``data``; returns the best-validation model and the per-epoch history.

    With ``checkpointing``, the full state is saved every ``every`` epochs (and at the last one),
    and ``resume`` continues from the newest valid checkpoint, giving the same model bit for bit
    as an uninterrupted run. ``stop_requested()`` returning a signal number ends the run after the
    epoch in progress, with a checkpoint, by raising ``Interrupted``. ``budget`` (a ``RowBudget``)
    lets a benchmark time and shorten epochs through a supported hook. ``start_from`` continues
    training a given model (its layers and input scaling replace the Erdos-Renyi init and the
    scaling fit, unless ``refit_scaling``; momentum starts at zero), as a fleet client does each round and
    ``ctre-edge train --from`` does on new data. The data may hold a subset of the model's classes.

    Longer than most functions on purpose: the order of the steps of an epoch (train, divergence
    check, validation, best snapshot, update, checkpoint, progress, signal) is the contract that makes
    a resumed run equal an uninterrupted one, so it reads top to bottom in one place.
    """
    config.validate()
    seeds = np.random.SeedSequence(config.seed).spawn(4)
    rng_split, rng_init, rng_shuffle, rng_evolve = (np.random.default_rng(s) for s in seeds)
    train_rows, val_rows, X_test, y_test = split_data(data, config, rng_split)
    sizes = [data.n_features, *config.hidden, len(data.classes)]
    classes = list(data.classes)
    if start_from is not None:
        if checkpointing is not None and (checkpointing.resume or checkpointing.auto):
            raise ConfigError("start_from and resume exclude each other: a resumed run continues its checkpoint")
        if start_from.sizes != sizes or [str(c) for c in start_from.classes] != [str(c) for c in classes]:
            raise ConfigError(f"start_from has layer sizes {start_from.sizes} and classes {start_from.classes}; "
                              f"this data and config need {sizes} and {classes}")
    if start_from is not None and not refit_scaling:
        shift, scale = start_from.shift, start_from.scale
    else:
        shift, scale = fit_scaling(data.X, train_rows, config.scaling)
    policy = TopologyPolicy(config, data.X, train_rows, shift, scale)
    data_print, latest = "", None
    if checkpointing is not None:
        resume = checkpointing.resume or (checkpointing.auto and bool(ckpt.checkpoint_files(checkpointing.directory)))
        ckpt.prepare_directory(checkpointing.directory, resume=resume, force=checkpointing.force)
        data_print = ckpt.data_fingerprint(data)
        if resume:  # auto: None when every checkpoint there is corrupt (set aside), so the run starts fresh
            latest = ckpt.load_latest(checkpointing.directory, config.to_dict(), data_print, warn,
                                      fresh_if_none=checkpointing.auto)
    if latest is not None:
        arrays, meta, _ = latest
        state = TrainState.restore(arrays, meta, sizes, classes, rng_shuffle, rng_evolve)
        policy.restore(meta["policy"])
    else:
        net = PackedNet.from_layers(start_from.layers if start_from is not None
                                    else init_layers(sizes, config.epsilon, rng_init, config.init))
        state = TrainState(net, net.snapshot(), rng_shuffle, rng_evolve)

    trainer = _EpochTrainer(data, config, state.net, shift, scale, train_rows, policy, budget)
    evaluator = Evaluator(state.net, shift, scale, max(1, min(config.eval_batch_size, val_rows.shape[0])), budget,
                          trainer.csc)
    n_classes = len(classes)
    majority = float(np.bincount(data.y[val_rows], minlength=n_classes).max() / max(1, val_rows.shape[0]))
    warnings = [m for m in (not_learning(state.history[:e], n_classes, majority, config)
                            for e in range(1, len(state.history) + 1)) if m][:1]
    for epoch in range(state.epoch, config.epochs):
        if stop_early(config, state, policy, epoch):  # a resumed run that had already stopped early
            break
        t0 = time.perf_counter()
        lr = learning_rate(config, epoch)
        loss, train_acc = trainer.epoch(state.rng_shuffle.permutation(train_rows), epoch, lr)
        if not math.isfinite(loss):
            last = f"; the last good checkpoint is in {checkpointing.directory}" if checkpointing else ""
            raise DivergedError(f"training diverged at epoch {epoch + 1} (loss is {loss}); "
                                f"try a lower learning rate than --lr {config.lr:g}{last}")
        stats = EpochStats(epoch + 1, loss, train_acc, evaluator.accuracy(data.X, val_rows, data.y), 0.0, lr)
        state.record(stats)
        ending = epoch + 1 == config.epochs or stop_early(config, state, policy, epoch + 1)
        if not ending:  # an update after the last epoch would only add untrained weights
            t1 = time.perf_counter()
            fault_point("update")
            stats.changed, stats.grown_cosine, stats.grown_random = policy.update(
                state.net, epoch, stats.val_accuracy, state.rng_evolve, trainer.csc, evaluator.act)
            stats.update_seconds = time.perf_counter() - t1
        stats.seconds = time.perf_counter() - t0
        state.history.append(stats)
        state.epoch = epoch + 1
        message = None if warnings else not_learning(state.history, n_classes, majority, config)
        if message:
            warnings.append(message)
            warn(message)
        signal_number = stop_requested() if stop_requested is not None else 0
        if checkpointing is not None and (signal_number or state.epoch % checkpointing.every == 0 or ending):
            ckpt.save(checkpointing.directory, state.epoch, state.arrays(shift, scale, classes),
                      state.meta(config.to_dict(), data_print, policy.state()))
        if progress is not None:
            progress(stats)
        if signal_number:
            where = f"; checkpoint written to {checkpointing.directory}" if checkpointing else " (no checkpoint)"
            raise Interrupted(f"stopped after epoch {state.epoch} of {config.epochs}{where}", 128 + signal_number)
        if ending:
            break

    del evaluator, trainer  # the test pass below allocates its own buffers
    result = _result(state, config, shift, scale, classes, X_test, y_test, int(train_rows.shape[0]), warnings)
    result.model.nan_policy, result.model.nan_fill = data.nan_policy, data.nan_fill
    return result


def stop_early(config: TrainConfig, state: TrainState, policy: TopologyPolicy, done: int) -> bool:
    """Early stop once ``done`` epochs are ``early_stop`` past the best one (ctre-seq: past its switch too)."""
    if not config.early_stop:
        return False
    since = state.best_epoch
    if config.method == "ctre-seq":
        if policy.switched_at is None:
            return False  # its cosine phase ends by its own patience rule
        since = max(since, policy.switched_at)
    return done - since >= config.early_stop


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


def _result(state: TrainState, config, shift, scale, classes, X_test, y_test, n_train: int,
            warnings: list[str]) -> TrainResult:
    """The best-validation model with its metrics, tested on the test part if there is one."""
    model = SparseMLP(state.best_layers, shift, scale, classes, config.to_dict())
    test_acc = None
    if X_test is not None and X_test.shape[0]:
        test_acc = float(np.mean(np.argmax(model.predict_proba(X_test, config.eval_batch_size), axis=1) == y_test))
    model.metrics = {"test_accuracy": test_acc, "best_epoch": state.best_epoch, "best_val_accuracy": state.best_acc,
                     "epochs": config.epochs, "epochs_run": len(state.history),
                     "stopped_early": len(state.history) < config.epochs, "train_samples": n_train,
                     "epoch_history": history_columns(state.history)}
    if warnings:
        model.metrics["warnings"] = warnings
    return TrainResult(model, state.history, state.best_epoch, test_acc, warnings)


HISTORY_FIELDS = ("epoch", "loss", "train_accuracy", "val_accuracy", "lr", "changed", "grown_cosine", "grown_random")


def history_columns(history: list[EpochStats]) -> dict:
    """The per-epoch record a saved model keeps as ``metrics["epoch_history"]`` (``ctre-edge report``
    draws it; a fleet's global model keeps its rounds under ``"history"``): one list per field.
    Timings are left out, so the same run still gives the same bytes."""
    return {name: [getattr(s, name) for s in history] for name in HISTORY_FIELDS}


class _EpochTrainer:
    """One epoch of SGD over the packed network, with every buffer allocated once per run."""

    def __init__(self, data: Dataset, config: TrainConfig, net: PackedNet, shift, scale, train_rows, policy,
                 budget: RowBudget | None):
        self.data, self.config, self.net, self.policy, self.budget = data, config, net, policy, budget
        self.shift, self.scale = shift, scale
        self.bs = bs = min(config.batch_size, train_rows.shape[0])
        # Rows at train_batches' stride (packed.row_stride), from 64-byte boundaries.
        self.act = net.activation_buffer(row_stride(bs))
        delta_a = aligned_empty(int(net.sizes.max()) * row_stride(bs))
        self.threads = numba.get_num_threads()  # set from the device profile; any count gives the same model
        # The CSC copy of the topology that the forward pass reads by output rows (8 bytes per
        # connection), on any thread count; rebuilt each epoch, as the topology update changes the
        # pattern between epochs. The validation pass and the topology update's sample read it too.
        self.csc = net.csc_buffers()
        self.buffers = (self.act, delta_a, aligned_empty(delta_a.shape[0]),
                        np.empty(int(np.diff(net.nz_off).max()), np.float32),
                        np.empty(int(net.sizes[1:].max()), np.float32), *self.csc)

    def _sgd(self, order, start: int, stop: int, chunk: int, sgd, threads: int, epoch: int | None):
        """SGD over order[start:stop] in kernel calls of ``chunk`` rows; with ``epoch``, each call's
        activations feed the sketches. Returns (loss sum, correct, whether the budget ended the part)."""
        loss, correct, s = 0.0, 0, start
        while s < stop:
            n = min(chunk, stop - s)
            if self.budget is not None and (n := self.budget.allow("train", n, order.shape[0] - s)) <= 0:
                return loss, correct, True
            rows = order[s:s + n]
            t = time.perf_counter()
            part_loss, part_correct = kernels.train_batches(self.data.X, self.data.y, rows, self.bs, *sgd, threads)
            if self.budget is not None:
                self.budget.spent("train", n, time.perf_counter() - t)
            loss += part_loss
            correct += part_correct
            if epoch is not None:
                self.policy.observe(level_views(self.act, self.net.sizes, n, row_stride(n)), rows, epoch)
            s += n
        return loss, correct, False

    def epoch(self, order, epoch: int, lr: float) -> tuple[float, float]:
        """Train on ``order`` (shuffled rows); returns (mean loss, training accuracy)."""
        c = self.config
        if self.csc[0].shape[0]:
            kernels.csc_all(*self.net[:6], *self.csc, CSC_MAX_CONNECTIONS)
        sgd = (self.shift, self.scale, *self.net, *self.buffers, np.float32(lr), np.float32(c.momentum),
               np.float32(c.l2))
        loss, correct, stopped = 0.0, 0, False
        first = 0
        if self.policy.wants_sketch:
            # Sketch mode: the epoch's first S samples (a uniform sample, the order being shuffled)
            # go one batch at a time, and their forward activations, still in ``act``, feed the
            # sketches: no extra pass over the data. Serial on purpose: these single batches
            # alternate with BLAS calls (the sketch's projection), and BLAS's workers, spinning
            # for about 0.1 s after each, made parallel batches 2x slower.
            first = min(order.shape[0], c.similarity_samples)
            loss, correct, stopped = self._sgd(order, 0, first, self.bs, sgd, 1, epoch)
        if not stopped:
            more_loss, more_correct, _ = self._sgd(order, first, order.shape[0], BATCHES_PER_CALL * self.bs, sgd,
                                                   self.threads, None)
            loss, correct = loss + more_loss, correct + more_correct
        return float(loss / order.shape[0]), correct / order.shape[0]


class Evaluator:
    """Validation accuracy of the packed network with one preallocated activation buffer.

    ``csc``: the trainer's CSC copy of the pattern (filled at the start of each epoch, so it holds
    the topology that validation sees, before the update), which the forward pass reads by output
    rows; or ``packed.no_csc()``."""

    def __init__(self, net: PackedNet, shift, scale, batch_size: int, budget: RowBudget | None = None, csc=None):
        self.net, self.shift, self.scale, self.bs, self.budget = net, shift, scale, batch_size, budget
        self.csc = no_csc() if csc is None else csc
        self.threads = numba.get_num_threads()  # the profile's cap; any count gives the same bits
        self.act = net.activation_buffer(batch_size)

    def accuracy(self, X, rows, y) -> float:
        """Accuracy over X[rows]; under a budget, over the rows it allowed (evaluated in batches)."""
        if rows.shape[0] == 0:
            return 0.0
        if self.budget is None:
            return self._correct(X, rows, y) / rows.shape[0]
        correct = done = 0
        while done < rows.shape[0]:
            n = self.budget.allow("validation", min(self.bs, rows.shape[0] - done), rows.shape[0] - done)
            if n <= 0:
                break
            t = time.perf_counter()
            correct += self._correct(X, rows[done:done + n], y)
            self.budget.spent("validation", n, time.perf_counter() - t)
            done += n
        return correct / max(done, 1)

    def proba(self, X, rows) -> np.ndarray:
        """Class probabilities of X[rows] (len(rows), n_classes), as ``kernels.predict_batches`` gives them.

        On ``threads`` > 1, where a batch has ``PARALLEL_MIN_WORK`` multiply-adds or more, each thread
        takes a contiguous part of the rows, in batches of bs // parts in its share of the buffer. A
        sample's probabilities do not depend on its batch (its sums add the same terms in the same
        order), so the bits are the same. Python threads over the GIL-free kernel, not a numba
        parallel one: that compiled the forward pass once more (+50 MiB of warmup peak, measured).
        """
        proba = np.empty((rows.shape[0], int(self.net.sizes[-1])), np.float32)
        args = (self.shift, self.scale, *self.net.forward, *self.csc)
        parts = min(self.threads, rows.shape[0], self.bs)
        if parts < 2 or int(self.net.nz_off[-1]) * min(self.bs, rows.shape[0]) < kernels.PARALLEL_MIN_WORK:
            kernels.predict_batches(X, rows, *args, self.bs, self.act, proba)
            return proba
        share, bounds = self.act.shape[0] // parts, [rows.shape[0] * t // parts for t in range(parts + 1)]
        in_threads(lambda t: kernels.predict_batches(X, rows[bounds[t]:bounds[t + 1]], *args, self.bs // parts,
                                                     self.act[t * share:(t + 1) * share],
                                                     proba[bounds[t]:bounds[t + 1]]), parts)
        return proba

    def _correct(self, X, rows, y) -> int:
        return int(np.sum(np.argmax(self.proba(X, rows), axis=1) == y[rows]))
