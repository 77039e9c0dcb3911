"""Training speed and peak memory of ctre-edge against a dense-masked numpy/BLAS baseline.

For 784-h-h-h-10 networks (h in --hidden-sizes, Erdos-Renyi at each --epsilons), one row per shape:
seconds per epoch and peak resident memory of

- **ctre-edge**: ``ctre_edge.train.train`` (SET, lr 0.01, batch 100), truly sparse;
- **dense-masked**: the same network written with numpy in this file the way sparse training is usually
  simulated: dense float32 weight matrices and dense float32 0/1 masks, gradients by BLAS matrix
  products and multiplied by the mask, the same Nesterov SGD (momentum 0.9, L2 1e-4), ReLU, softmax
  cross-entropy, batch 100, the same train/validation split, input scaling, initial topology and weights
  (``ctre_edge.train.init_layers`` with the same seed), a validation pass per epoch and the same SET rule
  applied to the masks after every epoch but the last (drop the floor(0.2 nnz) smallest |w|, regrow as
  many at random positions that are not kept). The weights are kept masked (gradient and momentum are
  masked), so the forward pass multiplies by W directly. It keeps no best-epoch copy (ctre-edge does),
  which favours it in memory;
- **scikit-learn** ``MLPClassifier`` (dense, SGD with Nesterov momentum), only if scikit-learn imports.

Each measurement runs in its own subprocess, so the peak RSS (``resource.getrusage`` in the child, which
includes the interpreter and libraries) is that run's alone; the engines alternate, and each cell is
the median over --repeats runs of the median epoch. An epoch includes its validation pass and its
topology update: each run trains --epochs timed epochs plus none after (ctre-edge's ``train`` is
stopped as on a signal once the timed epochs are done, since its last epoch has no update). The test
split of the data file is not used.
Where an epoch would take longer than --epoch-budget seconds, only as many batches (and validation
samples) as fit in the budget are run and the epoch is extrapolated linearly; the table says so. The
dense baseline is skipped where its estimated bytes (weights + masks + momentum + gradients) exceed
60% of MemAvailable.

Useful GFLOP/s counts 6 flops per connection per training sample (forward, input gradient, weight
gradient: one multiply-add, i.e. 2 flops, each) over the time spent in the training batches; for the
dense baseline the same useful work is divided by its time, and the flops it executes (6 per matrix
entry per sample) are given too. ctre-edge's kernels run on one core; numpy's BLAS uses every core unless
--blas-threads says otherwise. Other jobs on the machine skew the timings: the load average is printed.

    python tools/bench_train.py [--data mnist.npz | --data-dir DIR | --synthetic] [--quick] [--repeats 3]
                                [--hidden-sizes 1000,4000,16000,64000] [--epsilons 1,20] [--blas-threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

MiB = 1 << 20
SEED = 0
LR, MOMENTUM, L2, ZETA, BATCH, EVAL_BATCH = 0.01, 0.9, 1e-4, 0.2, 100, 1000


# --- machine and versions ----------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def meminfo(key: str) -> int | None:
    """A /proc/meminfo field in bytes, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # noqa: BLE001 - older numpy has no mode="dicts"
        return "unknown BLAS"


def machine_header() -> str:
    """Markdown lines naming the machine, the versions and the load, for the top of every tool's output."""
    import numba

    import ctre_edge

    total, avail = meminfo("MemTotal"), meminfo("MemAvailable")
    mem = f"{total / 2**30:.1f} GiB RAM, {avail / 2**30:.1f} GiB available" if total and avail else "RAM unknown"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {cpu_model()} ({platform.machine()}), {os.cpu_count()} cores; {mem}; "
            f"load average {load:.2f} at start\n"
            f"Python {platform.python_version()}; numpy {np.__version__} ({blas_name()}); numba {numba.__version__}; "
            f"ctre-edge {ctre_edge.__version__}")


def gemm_gflops(repeats: int = 30) -> float:
    """Dense float32 GEMM rate of this machine: median over ``repeats`` of a 1000x1000 @ 1000x100 product."""
    rng = np.random.default_rng(0)
    a = rng.random((1000, 1000), dtype=np.float32)
    b = rng.random((1000, 100), dtype=np.float32)
    out = np.empty((1000, 100), np.float32)
    for _ in range(3):
        np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return 2e-9 * 1000 * 1000 * 100 / statistics.median(times)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# --- data ------------------------------------------------------------------------------------------

def default_data_dir() -> Path | None:
    """``./datasets`` if present, else the ``shared/datasets`` folder beside this checkout (as the tests use)."""
    for candidate in (Path("datasets"), REPO.parent / "shared" / "datasets"):
        if candidate.is_dir():
            return candidate
    return None


def find_dataset(name: str, data_dir: str | None) -> Path:
    """``name`` (e.g. mnist.npz) inside --data-dir, or the default data folder; exits with a message if absent."""
    folder = Path(data_dir) if data_dir else default_data_dir()
    path = folder / name if folder is not None else None
    if path is None or not path.exists():
        where = f"in {data_dir}" if data_dir else "in ./datasets or the shared datasets folder"
        raise SystemExit(f"{name} not found {where}; pass --data PATH, --data-dir DIR or --synthetic")
    return path


def synthetic_mnist(n: int = 60000, n_features: int = 784, n_classes: int = 10, seed: int = 0, test: int = 0):
    """An MNIST-shaped uint8 data set: a random template per class plus noise, made in chunks (no big temporaries).

    Returns a ``ctre_edge.data.Dataset`` with ``test`` rows of X_test (none if 0).
    """
    from ctre_edge.data import make_dataset

    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(n_classes, n_features)).astype(np.int16)

    def make(count):
        y = np.arange(count) % n_classes
        rng.shuffle(y)
        X = np.empty((count, n_features), np.uint8)
        for s in range(0, count, 4096):
            e = min(count, s + 4096)
            noise = rng.integers(-80, 81, size=(e - s, n_features), dtype=np.int16)
            X[s:e] = np.clip(templates[y[s:e]] + noise, 0, 255)
        return X, y

    X, y = make(n)
    X_test, y_test = make(test) if test else (None, None)
    return make_dataset(X, y, X_test, y_test, name="synthetic", source="synthetic")


def load_child_data(spec: dict):
    """The data set of a child run: ``synthetic:N`` or an .npz path; the test split is dropped (not timed)."""
    from ctre_edge.data import Dataset, load_data

    if spec["data"].startswith("synthetic:"):
        return synthetic_mnist(int(spec["data"].split(":", 1)[1]))
    d = load_data(spec["data"])
    return Dataset(d.X, d.y, d.classes, None, None, d.name)


def dataset_rows(data) -> tuple[int, int]:
    """(train, validation) rows of a data set without a test part, as ``train.split_data`` splits it."""
    n = data.X.shape[0] if hasattr(data, "X") else data
    n_val = int(round(0.1 * n))
    return n - n_val, n_val


# --- the dense-masked baseline ------------------------------------------------------------------------

class DenseMLP:
    """An MLP with dense float32 weights, optionally times dense float32 0/1 masks (sparse training simulated).

    ``layers`` are ``ctre_edge.layers.SparseLayer`` (same topology and weights as ctre-edge's start);
    with ``masked=False`` they must be fully connected. Activations are batch-major ``(batch, features)``.
    ``keep_best`` holds a copy of the weights of the best validation epoch (for reporting accuracy).
    """

    def __init__(self, layers, masked: bool = True, keep_best: bool = False):
        self.masked = masked
        self.sizes = [layers[0].n_in] + [layer.n_out for layer in layers]
        self.W, self.M, self.V, self.G, self.b, self.bv = [], [], [], [], [], []
        for layer in layers:
            shape = (layer.n_in, layer.n_out)
            rows, cols = layer.rows(), layer.indices
            W = _filled(shape, 0.0)
            W[rows, cols] = layer.values
            if masked:
                M = _filled(shape, 0.0)  # written in full, so its pages are really resident
                M[rows, cols] = 1.0
                self.M.append(M)
            elif layer.nnz != layer.n_in * layer.n_out:
                raise ValueError("an unmasked DenseMLP needs fully connected layers")
            self.W.append(W)
            self.V.append(_filled(shape, 0.0))
            self.G.append(_filled(shape, 0.0))
            self.b.append(layer.bias.astype(np.float32).copy())
            self.bv.append(np.zeros(layer.n_out, np.float32))
        self.best = None
        if keep_best:
            self.snapshot()

    @staticmethod
    def bytes_estimate(sizes, masked=True, keep_best=False, batch=BATCH, eval_batch=EVAL_BATCH) -> int:
        """Weights + masks + momentum + gradients (+ best copy), and the activations of one evaluation batch."""
        entries = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        per = 4 * (4 if masked else 3) + (4 if keep_best else 0)
        return per * entries + 4 * 2 * max(batch, eval_batch) * sum(sizes)

    def snapshot(self):
        self.best = ([w.copy() for w in self.W], [b.copy() for b in self.b])

    def forward(self, x, weights=None):
        """Activations of every level for a scaled batch x (B, n_in); the last is softmax probabilities."""
        W, b = weights if weights is not None else (self.W, self.b)
        acts = [x]
        for l in range(len(W)):
            z = acts[-1] @ W[l]
            z += b[l]
            if l < len(W) - 1:
                np.maximum(z, 0.0, out=z)
            else:
                z -= z.max(axis=1, keepdims=True)
                np.exp(z, out=z)
                z /= z.sum(axis=1, keepdims=True)
            acts.append(z)
        return acts

    def train_batch(self, x, y, lr, momentum, l2):
        """One SGD step on a scaled batch; returns (sum of sample losses, correct predictions)."""
        acts = self.forward(x)
        p = acts[-1]
        nb = x.shape[0]
        idx = np.arange(nb)
        loss = float(-np.log(np.maximum(p[idx, y], 1e-30)).sum())
        correct = int((p.argmax(axis=1) == y).sum())
        d = p
        d[idx, y] -= 1.0
        d *= np.float32(1.0 / nb)
        for l in range(len(self.W) - 1, -1, -1):
            x_l = acts[l]
            np.matmul(x_l.T, d, out=self.G[l])
            bias_grad = d.sum(axis=0)
            dx = d @ self.W[l].T if l > 0 else None  # with the weights before this step, as ctre-edge
            self._step(l, lr, momentum, l2)
            g = bias_grad
            self.bv[l] *= momentum
            self.bv[l] -= lr * g
            self.b[l] += momentum * self.bv[l] - lr * g
            if l > 0:
                dx *= x_l > 0
                d = dx
        return loss, correct

    def _step(self, l, lr, momentum, l2):
        """Nesterov step (Keras' form, as ``kernels.nesterov_step``) on masked gradients, in row blocks."""
        W, V, G = self.W[l], self.V[l], self.G[l]
        M = self.M[l] if self.masked else None
        step = max(1, (1 << 20) // W.shape[1])  # blocks of about 4 MiB: temporaries stay small
        lr, momentum, l2 = np.float32(lr), np.float32(momentum), np.float32(l2)
        for r in range(0, W.shape[0], step):
            w, v, g = W[r:r + step], V[r:r + step], G[r:r + step]
            if M is not None:
                g *= M[r:r + step]
            g += l2 * w
            g *= lr          # g is now lr * (gradient + l2 w)
            v *= momentum
            v -= g
            w += momentum * v
            w -= g

    def set_update(self, zeta, rng):
        """SET on the masks: drop the floor(zeta nnz) smallest |w| per layer, regrow as many at random free positions."""
        for l in range(len(self.W)):
            M, W, V = self.M[l].ravel(), self.W[l].ravel(), self.V[l].ravel()
            n_in = self.W[l].shape[0]
            pos = np.flatnonzero(M)
            k = int(math.floor(zeta * pos.shape[0]))
            if k == 0 or M.shape[0] - pos.shape[0] + k < k:
                continue
            order = np.lexsort((rng.random(pos.shape[0]), np.abs(W[pos])))
            drop = pos[order[:k]]
            M[drop] = 0.0
            W[drop] = 0.0
            V[drop] = 0.0
            new = _random_free(M, k, rng)
            M[new] = 1.0
            bound = math.sqrt(6.0 / n_in)
            W[new] = rng.uniform(-bound, bound, size=k).astype(np.float32)

    def predict_proba(self, X, rows, shift, scale, batch=EVAL_BATCH, weights=None):
        out = np.empty((rows.shape[0], self.sizes[-1]), np.float32)
        for s in range(0, rows.shape[0], batch):
            r = rows[s:s + batch]
            out[s:s + r.shape[0]] = self.forward(scaled(X, r, shift, scale), weights)[-1]
        return out


def _filled(shape, value) -> np.ndarray:
    a = np.empty(shape, np.float32)
    a.fill(value)
    return a


def _random_free(M, k, rng) -> np.ndarray:
    """k distinct positions where the flat mask M is 0, uniformly at random."""
    free = M.shape[0] - int(np.count_nonzero(M))
    if free < 4 * k:
        candidates = np.flatnonzero(M == 0)
        return candidates[rng.choice(candidates.shape[0], size=k, replace=False)]
    chosen = np.empty(0, np.int64)
    while chosen.shape[0] < k:
        draw = rng.integers(0, M.shape[0], size=2 * (k - chosen.shape[0]) + 16)
        draw = draw[M[draw] == 0]
        pool = np.concatenate([chosen, draw])
        _, first = np.unique(pool, return_index=True)
        chosen = pool[np.sort(first)][:k]
    return chosen


def scaled(X, rows, shift, scale) -> np.ndarray:
    """(X[rows] - shift) * scale as float32 (batch, features)."""
    x = X[rows].astype(np.float32)
    x -= shift
    x *= scale
    return x


def dense_run(data, hidden, epsilon, epochs, seed=SEED, *, masked=True, method="set", lr=LR, momentum=MOMENTUM,
              l2=L2, zeta=ZETA, batch=BATCH, scaling="minmax", keep_best=False, train_budget=None,
              val_budget=None, min_batches=2, test=False, timed_epochs=None, init="dense-glorot",
              early_stop=0) -> dict:
    """Train the numpy DenseMLP with ctre-edge's seeds, split, scaling and initial network.

    Returns per-epoch timings (with extrapolation where a budget cut the epoch short) and, with
    ``test``, the test accuracy of the best validation epoch (``keep_best`` must be set). With
    ``timed_epochs``, only that many of the ``epochs`` are run (each with its topology update).
    ``init`` as ``TrainConfig.init`` ("sparse" on a fully connected layer is He/LeCun uniform);
    ``early_stop`` N > 0 ends the run N epochs after the best validation epoch, as ctre-edge does.
    """
    from ctre_edge.data import fit_scaling
    from ctre_edge.train import TrainConfig, init_layers, split_data

    config = TrainConfig(hidden=tuple(hidden), epsilon=epsilon, seed=seed, scaling=scaling,
                         test_fraction=0.2 if test else 0.0).validate()
    seeds = np.random.SeedSequence(seed).spawn(4)
    rng_split, rng_init, rng_shuffle, rng_evolve = (np.random.default_rng(s) for s in seeds)
    train_rows, val_rows, X_test, y_test = split_data(data, config, rng_split)
    shift, scale = fit_scaling(data.X, train_rows, scaling)
    sizes = [data.n_features, *hidden, len(data.classes)]
    net = DenseMLP(init_layers(sizes, epsilon, rng_init, init), masked=masked, keep_best=keep_best)
    lr, momentum, l2 = np.float32(lr), np.float32(momentum), np.float32(l2)
    history, best_acc, best_epoch = [], -1.0, 0
    for epoch in range(epochs if timed_epochs is None else min(epochs, timed_epochs)):
        if early_stop and keep_best and epoch - best_epoch >= early_stop:
            break
        t0 = time.perf_counter()
        order = rng_shuffle.permutation(train_rows)
        n_batches = math.ceil(order.shape[0] / batch)
        done = samples = 0
        loss = 0.0
        for s in range(0, order.shape[0], batch):
            if train_budget is not None and done >= min_batches and time.perf_counter() - t0 >= train_budget:
                break
            r = order[s:s + batch]
            part, _ = net.train_batch(scaled(data.X, r, shift, scale), data.y[r], lr, momentum, l2)
            loss += part
            done += 1
            samples += r.shape[0]
        t_train = time.perf_counter() - t0
        if not math.isfinite(loss):
            raise SystemExit(f"dense baseline diverged at epoch {epoch + 1}")
        t1 = time.perf_counter()
        val_done = 0
        correct = 0
        chunk = EVAL_BATCH if val_budget is None else BATCH  # small steps when the pass may be cut short
        for s in range(0, val_rows.shape[0], chunk):
            if val_budget is not None and val_done and time.perf_counter() - t1 >= val_budget:
                break
            r = val_rows[s:s + chunk]
            correct += int((net.predict_proba(data.X, r, shift, scale).argmax(axis=1) == data.y[r]).sum())
            val_done += r.shape[0]
        t_val = time.perf_counter() - t1
        val_acc = correct / max(val_done, 1)
        if keep_best and val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch + 1
            net.snapshot()
        t_update = 0.0
        if epoch < epochs - 1 and method == "set" and masked:
            t2 = time.perf_counter()
            net.set_update(zeta, rng_evolve)
            t_update = time.perf_counter() - t2
        seconds = time.perf_counter() - t0
        history.append(_epoch_record(seconds, t_train, done, n_batches, samples, t_val, val_done,
                                     val_rows.shape[0], t_update))
    out = {"history": history, "best_epoch": best_epoch, "sizes": sizes,
           "entries": sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))}
    if test and X_test is not None and X_test.shape[0]:
        proba = net.predict_proba(X_test, np.arange(X_test.shape[0]), shift, scale, weights=net.best)
        out["test_accuracy"] = float(np.mean(proba.argmax(axis=1) == y_test))
    return out


def _epoch_record(seconds, t_train, done, n_batches, samples, t_val, val_done, n_val, t_update) -> dict:
    """Timings of one epoch; ``epoch_seconds`` scales the training and validation parts to the whole epoch."""
    extra = 0.0
    if done and done < n_batches:
        extra += t_train * (n_batches / done - 1)
    if val_done and val_done < n_val:
        extra += t_val * (n_val / val_done - 1)
    return {"seconds": seconds, "epoch_seconds": seconds + extra, "train_seconds": t_train, "batches": done,
            "batches_total": n_batches, "samples": samples, "val_seconds": t_val, "val_samples": val_done,
            "val_total": n_val, "update_seconds": t_update}


# --- ctre-edge, with an optional time box ---------------------------------------------------------------

class TimeBox:
    """Wraps ``kernels.train_batches`` and ``Evaluator.accuracy`` for one ``train()`` call.

    Within an epoch, training batches run until ``train_budget`` seconds are spent (at least
    ``min_batches``), and validation batches until ``val_budget`` (at least one); the rest of the
    epoch is skipped and its time extrapolated. With no budgets the epoch runs whole and the wrappers
    only time it. The same kernels are called on the same buffers; only the row range shrinks.
    """

    def __init__(self, train_budget=None, val_budget=None, min_batches=2):
        self.train_budget, self.val_budget, self.min_batches = train_budget, val_budget, min_batches
        self.records = []
        self.calls = 0
        self._reset()

    def _reset(self):
        self.t_train = self.t_val = 0.0
        self.done = self.total = self.samples = self.val_done = self.val_total = 0

    def __enter__(self):
        from ctre_edge import kernels, train as train_module

        self._kernels, self._evaluator = kernels, train_module.Evaluator
        self._real_train, self._real_accuracy = kernels.train_batches, train_module.Evaluator.accuracy
        box = self

        def train_batches(X, y, order, batch_size, *rest):
            return box._train(X, y, order, batch_size, rest)

        def accuracy(evaluator, X, rows, y):
            return box._accuracy(evaluator, X, rows, y)

        kernels.train_batches = train_batches
        train_module.Evaluator.accuracy = accuracy
        return self

    def __exit__(self, *exc):
        self._kernels.train_batches = self._real_train
        self._evaluator.accuracy = self._real_accuracy

    def _train(self, X, y, order, bs, rest):
        self.calls += 1
        n = order.shape[0]
        nb = -(-n // bs)
        self.total += nb
        loss, correct, i = 0.0, 0, 0
        while i < nb:
            spent = self.t_train
            if self.train_budget is None:
                take = nb
            else:
                if self.done >= self.min_batches and spent >= self.train_budget:
                    break
                per = spent / self.done if self.done else None
                take = 1 if per is None else max(1, int((self.train_budget - spent) / per))
                take = max(take, self.min_batches - self.done)
            take = min(take, nb - i)
            part = order[i * bs:(i + take) * bs]
            t = time.perf_counter()
            l_, c_ = self._real_train(X, y, part, bs, *rest)
            self.t_train += time.perf_counter() - t
            loss += l_
            correct += c_
            self.done += take
            self.samples += part.shape[0]
            i += take
        return loss, correct

    def _accuracy(self, evaluator, X, rows, y):
        self.val_total += rows.shape[0]
        if self.val_budget is None:
            t = time.perf_counter()
            acc = self._real_accuracy(evaluator, X, rows, y)
            self.t_val += time.perf_counter() - t
            self.val_done += rows.shape[0]
            return acc
        correct = 0
        for s in range(0, rows.shape[0], evaluator.bs):
            if self.val_done and self.t_val >= self.val_budget:
                break
            part = rows[s:s + evaluator.bs]
            t = time.perf_counter()
            correct += self._real_accuracy(evaluator, X, part, y) * part.shape[0]
            self.t_val += time.perf_counter() - t
            self.val_done += part.shape[0]
        return correct / max(self.val_done, 1)

    def end_epoch(self, stats):
        rec = _epoch_record(stats.seconds, self.t_train, self.done, self.total, self.samples, self.t_val,
                            self.val_done, self.val_total, stats.update_seconds)
        self.records.append(rec)
        self._reset()


def warm_up(data) -> None:
    """Load every kernel the run will use (same dtypes) with a tiny training run, so epoch 1 is not a load."""
    from ctre_edge.data import make_dataset
    from ctre_edge.train import TrainConfig, train

    y = data.y
    rows = np.concatenate([np.flatnonzero(y == c)[:30] for c in range(len(data.classes))])
    tiny = make_dataset(data.X[rows], y[rows], name="warm-up")
    train(tiny, TrainConfig(hidden=(8, 8), epochs=2, test_fraction=0.0, similarity_samples=64))


def ctre_run(data, config, *, timed_epochs=None, train_budget=None, val_budget=None, min_batches=2) -> dict:
    """``ctre_edge.train.train`` under a TimeBox; per-epoch records and the nnz per layer.

    With ``timed_epochs``, ``config.epochs`` must exceed it: the run stops (as on a signal) after that
    many epochs, each of which has had its topology update, and no test pass is made.
    """
    from ctre_edge.layers import er_nnz
    from ctre_edge.train import Interrupted, train

    warm_up(data)
    calls = [0]

    def stop_requested():
        calls[0] += 1
        return 1 if timed_epochs is not None and calls[0] >= timed_epochs else 0

    result = None
    with TimeBox(train_budget, val_budget, min_batches) as box:
        try:
            result = train(data, config, progress=box.end_epoch, stop_requested=stop_requested)
        except Interrupted:
            pass
    if box.calls == 0:
        raise SystemExit("ctre_edge.train no longer calls kernels.train_batches through the module; "
                         "update TimeBox in tools/bench_train.py")
    sizes = [data.n_features, *config.hidden, len(data.classes)]
    return {"history": box.records, "nnz": [er_nnz(a, b, config.epsilon) for a, b in zip(sizes[:-1], sizes[1:])],
            "sizes": sizes, "test_accuracy": None if result is None else result.test_accuracy}


# --- scikit-learn (optional) ------------------------------------------------------------------------------

def sklearn_run(data, hidden, epochs, *, train_budget=None, seed=SEED) -> dict:
    """MLPClassifier (dense) with the same settings: SGD, Nesterov momentum 0.9, lr 0.01, L2 1e-4, batch 100.

    Each epoch is ``partial_fit`` over the shuffled training rows in chunks (so a time budget can cut it
    short), then a validation pass.
    """
    from sklearn.neural_network import MLPClassifier

    from ctre_edge.data import fit_scaling
    from ctre_edge.train import TrainConfig, split_data

    config = TrainConfig(hidden=tuple(hidden), seed=seed, test_fraction=0.0).validate()
    seeds = np.random.SeedSequence(seed).spawn(4)
    rng_split, _, rng_shuffle, _ = (np.random.default_rng(s) for s in seeds)
    train_rows, val_rows, _, _ = split_data(data, config, rng_split)
    shift, scale = fit_scaling(data.X, train_rows, "minmax")
    clf = MLPClassifier(hidden_layer_sizes=tuple(hidden), solver="sgd", learning_rate_init=LR, momentum=MOMENTUM,
                        nesterovs_momentum=True, alpha=L2, batch_size=BATCH, shuffle=False, random_state=seed)
    classes = np.arange(len(data.classes))
    chunk = 20 * BATCH
    history = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        order = rng_shuffle.permutation(train_rows)
        n_batches = math.ceil(order.shape[0] / BATCH)
        done = samples = 0
        for s in range(0, order.shape[0], chunk):
            if train_budget is not None and done and time.perf_counter() - t0 >= train_budget:
                break
            r = order[s:s + chunk]
            clf.partial_fit(scaled(data.X, r, shift, scale), data.y[r], classes=classes)
            done += -(-r.shape[0] // BATCH)
            samples += r.shape[0]
        t_train = time.perf_counter() - t0
        t1 = time.perf_counter()
        clf.predict(scaled(data.X, val_rows, shift, scale))
        t_val = time.perf_counter() - t1
        history.append(_epoch_record(time.perf_counter() - t0, t_train, done, n_batches, samples, t_val,
                                     val_rows.shape[0], val_rows.shape[0], 0.0))
    return {"history": history}


def sklearn_available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True


# --- child process -----------------------------------------------------------------------------------

def child(spec: dict) -> dict:
    data = load_child_data(spec)
    hidden = spec["hidden"]
    budget = spec.get("budget")
    val_budget = None if budget is None else budget / 3
    if spec["engine"] == "ctre":
        from ctre_edge.train import TrainConfig

        config = TrainConfig(hidden=tuple(hidden), method="set", epsilon=spec["epsilon"], epochs=spec["epochs"] + 1,
                             lr=LR, batch_size=BATCH, seed=SEED, test_fraction=0.0).validate()
        out = ctre_run(data, config, timed_epochs=spec["epochs"], train_budget=budget, val_budget=val_budget)
    elif spec["engine"] == "dense":
        out = dense_run(data, hidden, spec["epsilon"], spec["epochs"] + 1, timed_epochs=spec["epochs"],
                        train_budget=budget, val_budget=val_budget)
    else:
        out = sklearn_run(data, hidden, spec["epochs"], train_budget=budget)
    out["peak_rss_bytes"] = peak_rss_bytes()
    return out


BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def child_env(blas_threads: int = 0) -> dict:
    """The environment of a child: BLAS limited to ``blas_threads`` threads (0: the library's default)."""
    env = dict(os.environ)
    if blas_threads:
        env.update({k: str(blas_threads) for k in BLAS_THREAD_VARIABLES})
    return env


def gemm_gflops_with(threads: int) -> float:
    """``gemm_gflops`` in a fresh interpreter whose BLAS uses ``threads`` threads (0: its default)."""
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import bench_train; print(bench_train.gemm_gflops())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(threads))
    return float(out.stdout.strip()) if out.returncode == 0 else float("nan")


def run_child(spec: dict, timeout: float = 7200, blas_threads: int = 0, script: str = __file__) -> dict:
    """Run ``script --child SPEC`` (this tool's ``child(spec)`` by default) in a fresh interpreter;
    returns the JSON it prints last, or {"error": last stderr line}."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=child_env(blas_threads))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode:
        lines = out.stderr.strip().splitlines() or [f"exit code {out.returncode}"]
        return {"error": lines[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_kernel_cache() -> None:
    """Compile ctre-edge's kernels into numba's cache once (a no-op when warm), so no timed run compiles."""
    res = run_child({"data": "synthetic:600", "hidden": [8], "epsilon": 1.0, "epochs": 1, "budget": None,
                     "engine": "ctre"})
    if "error" in res:
        raise SystemExit(f"warm-up run failed: {res['error']}")


def epoch_median(history: list[dict]) -> dict:
    """The median epoch of a run (the lower one of an even count)."""
    return sorted(history, key=lambda h: h["epoch_seconds"])[(len(history) - 1) // 2]


# --- report ----------------------------------------------------------------------------------------

def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.3g}" if s < 100 else f"{s:,.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="MNIST-like .npz file (default: mnist.npz in --data-dir)")
    ap.add_argument("--data-dir", help="folder holding mnist.npz (default: ./datasets, else the shared datasets folder)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic MNIST-shaped uint8 data instead of MNIST")
    ap.add_argument("--hidden-sizes", default="1000,4000,16000,64000", help="hidden widths h of 784-h-h-h-10")
    ap.add_argument("--epsilons", default="1,20")
    ap.add_argument("--layers", type=int, default=3, help="hidden layers")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per run, each with its topology update")
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine and shape (median reported)")
    ap.add_argument("--epoch-budget", type=float, default=60.0,
                    help="seconds of training per epoch before extrapolating (validation gets a third of it)")
    ap.add_argument("--memory-fraction", type=float, default=0.6,
                    help="skip the dense baseline above this fraction of MemAvailable")
    ap.add_argument("--blas-threads", type=int, default=0,
                    help="BLAS threads of the dense baseline and scikit-learn (0: the library default, all cores)")
    ap.add_argument("--quick", action="store_true",
                    help="only (h, eps) = (1000, 1), (1000, 20), (16000, 1); 1 epoch; 2 repeats; 8 s budget")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    shapes = [(int(h), float(e)) for h in args.hidden_sizes.split(",") for e in args.epsilons.split(",")]
    if args.quick:
        shapes, args.epochs, args.repeats, args.epoch_budget = [(1000, 1.0), (1000, 20.0), (16000, 1.0)], 1, 2, 8.0
    n_synthetic = 60000
    if args.smoke:
        shapes, args.epochs, args.repeats, args.epoch_budget = [(64, 1.0)], 1, 1, 5.0
        args.synthetic, n_synthetic = True, 2000
    if args.synthetic:
        data_spec, n_samples, n_features, n_classes = f"synthetic:{n_synthetic}", n_synthetic, 784, 10
        data_name = f"synthetic MNIST-shaped uint8, {n_synthetic} x 784"
    else:
        path = Path(args.data) if args.data else find_dataset("mnist.npz", args.data_dir)
        if not path.exists():
            raise SystemExit(f"{path.name} not found")
        from ctre_edge.data import summarize_data

        summary = summarize_data(str(path))
        data_spec, n_samples, n_features, n_classes = str(path), summary.n_samples, summary.n_features, summary.n_classes
        data_name = f"{path.name}, {n_samples} x {n_features} (its test part is not used)"
    n_train, n_val = dataset_rows(n_samples)
    with_sklearn = sklearn_available()

    from ctre_edge.layers import er_nnz

    warm_kernel_cache()
    print(machine_header())
    gemm_all, gemm_one = gemm_gflops_with(0), gemm_gflops_with(1)
    print(f"numpy float32 GEMM 1000x1000 @ 1000x100: {gemm_all:.0f} GFLOP/s with the BLAS default threads, "
          f"{gemm_one:.0f} GFLOP/s with 1 thread (median of 30)")
    print(f"dense baseline BLAS threads: {args.blas_threads or 'library default (all cores)'}; "
          "ctre-edge's training kernels run on one core")
    print(f"data: {data_name}, about {n_train} training and {n_val} validation rows per epoch; SET, lr {LR}, "
          f"batch {BATCH}; {args.epochs} timed epoch(s) per run (each with its topology update), median epoch; "
          f"median of {args.repeats} run(s) per engine, engines alternated; epoch budget {args.epoch_budget:g} s")
    print("scikit-learn: " + ("MLPClassifier column included" if with_sklearn else "not importable, column omitted"))
    print()
    head = ["h", "eps", "connections", "ctre-edge s/epoch", "dense-masked s/epoch", "speed-up"]
    head += ["sklearn s/epoch"] if with_sklearn else []
    head += ["ctre-edge peak MiB", "dense peak MiB", "memory ratio", "ctre-edge useful GFLOP/s",
             "dense useful / executed GFLOP/s", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    avail = meminfo("MemAvailable") or 0
    for h, eps in shapes:
        if True:
            sizes = [n_features] + [h] * args.layers + [n_classes]
            nnz = sum(er_nnz(a, b, eps) for a, b in zip(sizes[:-1], sizes[1:]))
            spec = {"data": data_spec, "hidden": [h] * args.layers, "epsilon": eps, "epochs": args.epochs,
                    "budget": args.epoch_budget}
            engines = ["ctre", "dense"] + (["sklearn"] if with_sklearn else [])
            skip = {}
            need = DenseMLP.bytes_estimate(sizes) + 200 * MiB
            if avail and need > args.memory_fraction * avail:
                skip["dense"] = (f"dense skipped: needs about {need / 2**30:.1f} GiB, above "
                                 f"{args.memory_fraction:.0%} of the {avail / 2**30:.1f} GiB available")
            if with_sklearn and avail and 2 * need > args.memory_fraction * avail:
                skip["sklearn"] = "sklearn skipped: float64 weights would not fit"
            runs = {e: [] for e in engines}
            errors = {}
            for r in range(args.repeats):
                order = engines if r % 2 == 0 else engines[::-1]
                for e in order:
                    if e in skip or e in errors:
                        continue
                    res = run_child(dict(spec, engine=e), blas_threads=0 if e == "ctre" else args.blas_threads)
                    if "error" in res:
                        errors[e] = res["error"]
                    else:
                        runs[e].append(res)
            row = summarize_row(h, eps, nnz, sizes, runs, errors, skip, with_sklearn)
            print("| " + " | ".join(row) + " |", flush=True)


def summarize_row(h, eps, nnz, sizes, runs, errors, skip, with_sklearn) -> list[str]:
    entries = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    cell, notes = {}, []
    for e, results in runs.items():
        if not results:
            cell[e] = None
            if e in errors:
                notes.append(f"{e} failed: {errors[e]}")
            elif e in skip:
                notes.append(skip[e])
            continue
        mids = [epoch_median(r["history"]) for r in results]
        secs = statistics.median(m["epoch_seconds"] for m in mids)
        rate = statistics.median(6 * nnz * m["samples"] / m["train_seconds"] / 1e9 for m in mids if m["train_seconds"])
        peak = statistics.median(r["peak_rss_bytes"] for r in results) / MiB
        cell[e] = (secs, rate, peak, mids[0])
        m = mids[0]
        if m["batches"] < m["batches_total"] or m["val_samples"] < m["val_total"]:
            notes.append(f"{e}: extrapolated from {m['batches']}/{m['batches_total']} batches, "
                         f"{m['val_samples']}/{m['val_total']} validation rows")
    c, d = cell.get("ctre"), cell.get("dense")
    row = [f"{h:,}", f"{eps:g}", f"{nnz:,}", fmt_seconds(c[0]) if c else "-", fmt_seconds(d[0]) if d else "-",
           f"{d[0] / c[0]:.1f}x" if c and d else "-"]
    if with_sklearn:
        s = cell.get("sklearn")
        row.append(fmt_seconds(s[0]) if s else "-")
    row += [f"{c[2]:,.0f}" if c else "-", f"{d[2]:,.0f}" if d else "-",
            f"{d[2] / c[2]:.1f}x" if c and d else "-",
            f"{c[1]:.2f}" if c else "-",
            f"{d[1]:.3f} / {d[1] * entries / nnz:.0f}" if d else "-",
            "; ".join(notes) or "full epochs"]
    return row


if __name__ == "__main__":
    main()
