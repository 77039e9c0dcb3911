"""The dense baselines ctre-edge is compared with: a dense(-masked) numpy/BLAS MLP, and scikit-learn's.

``DenseMLP`` is the network written the way sparse training is usually simulated: dense float32
weights times dense float32 0/1 masks, gradients by BLAS products masked afterwards, the same Nesterov
SGD as ``kernels.nesterov_step``, ReLU, softmax cross-entropy. With ``masked=False`` it is a plain
dense MLP (the dense row of ``tools/reproduce.py``). ``dense_run`` trains it with ctre-edge's seeds,
split, scaling and initial network; ``sklearn_run`` trains scikit-learn's ``MLPClassifier`` if present.
"""

from __future__ import annotations

import math
import time

import numpy as np

from tools._common import BATCH, EVAL_BATCH, L2, LR, MOMENTUM, SEED, ZETA, epoch_record


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
        """SET on the masks: drop the floor(zeta nnz) smallest |w| per layer, regrow as many at random free
        positions."""
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
        history.append(epoch_record(seconds, t_train, done, n_batches, samples, t_val, val_done,
                                     val_rows.shape[0], t_update))
    out = {"history": history, "best_epoch": best_epoch, "sizes": sizes,
           "entries": sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))}
    if test and X_test is not None and X_test.shape[0]:
        proba = net.predict_proba(X_test, np.arange(X_test.shape[0]), shift, scale, weights=net.best)
        out["test_accuracy"] = float(np.mean(proba.argmax(axis=1) == y_test))
    return out


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
        history.append(epoch_record(time.perf_counter() - t0, t_train, done, n_batches, samples, t_val,
                                     val_rows.shape[0], val_rows.shape[0], 0.0))
    return {"history": history}


def sklearn_available() -> bool:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return False
    return True
