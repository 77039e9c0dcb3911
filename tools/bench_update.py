"""Cost of one CTRE topology update (exact and sketch scoring) next to one training epoch.

Trains the paper's network (784-1000-1000-1000-10 at epsilon 1 by default) for a few epochs with
ctre-sim, once per scoring mode, and prints the median seconds of the training part of an epoch and
of the topology update, and their ratio. Sketch mode also spends time inside the epoch folding
activations into the sketches; that cost is in the epoch column.

    python -m tools.bench_update --data mnist.npz [--epochs 6] [--samples 2000] [--epsilon 1]

With ``--base DIR`` (another checkout), it instead times the exact ctre-sim update of both
checkouts in ONE process, alternating, on the same network (trained here for --epochs epochs, so it
has the dead neurons of a trained network) and the same random draws, and says whether the two
updated networks are bit-identical; the fastest of --passes updates each. A checkout whose update
reads the trainer's CSC copy of the pattern (kept on any thread count since 2026-12-07) gets one.
The machine's speed drifts too much between runs for two separate runs to compare (see
``tools/bench_ab.py``).

    python -m tools.bench_update --data mnist.npz --base ../base [--epsilon 20] [--passes 15]

With ``--phases``, it times this checkout's exact update on such a trained network, --passes times,
and prints where one update's time goes (medians over the passes): the activation sample until the
first layer's scoring starts; the GEMMs with their scans and the drops and grows (without the
scoring inside them), each as thread time summed over its calls, since where the layers are scored
whole these parts overlap on the threads; and the whole update. Each checkout's policy is kept from
update to update, as the trainer keeps it (an update after one that scored the layers whole
overlaps the sample with the scoring).

    python -m tools.bench_update --data mnist.npz --phases [--epsilon 1] [--passes 15]
"""

import argparse
import functools
import importlib
import inspect
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ctre_edge.train import TrainConfig, train
from tools._common import add_update_network_args, load_update_network, machine_header


def load_checkout(path: Path) -> dict:
    """Another checkout's ctre_edge modules, imported under their own names and then set aside, so
    that their imports of each other (``from ctre_edge import kernels``) bind to that checkout."""
    ours = {n: m for n, m in sys.modules.items() if n == "ctre_edge" or n.startswith("ctre_edge.")}
    for n in ours:
        del sys.modules[n]
    sys.path.insert(0, str(path))
    try:
        modules = {n: importlib.import_module(f"ctre_edge.{n}") for n in ("packed", "evolve", "kernels")}
    finally:
        sys.path.remove(str(path))
        for n in [n for n in sys.modules if n == "ctre_edge" or n.startswith("ctre_edge.")]:
            del sys.modules[n]
        sys.modules.update(ours)
    return modules


SCRATCH = {}  # per checkout: the validation buffer a trainer would lend its updates


POLICIES = {}  # one per checkout: the trainer keeps its policy, which remembers how the last update scored


def timed_update(modules, layers, config, X, rows, shift, scale):
    net = modules["packed"].PackedNet.from_layers(layers)
    key = (id(modules["evolve"]), id(layers))
    if key not in POLICIES:
        POLICIES[key] = modules["evolve"].TopologyPolicy(config, X, rows, shift, scale)
    policy = POLICIES[key]
    extra = ()
    params = inspect.signature(policy.update).parameters
    if "csc" in params:
        # The CSC copy the trainer keeps (on any thread count), which this update's forward pass reads.
        extra = (net.csc_buffers(),)
        modules["kernels"].csc_all(*net[:6], *extra[0], modules["packed"].CSC_MAX_CONNECTIONS)
    if "scratch" in params:
        # The trainer's validation buffer, which such an update borrows (written once, as validation has).
        size = int(net.sizes.sum()) * config.eval_batch_size
        extra = (*extra, SCRATCH.setdefault(id(modules["evolve"]), np.ones(size, np.float32)))
    # In training the validation pass runs on this thread just before an update: 0.2 s of work
    # here stands in for it (idle cores wake slowly in a VM), and it outlasts the other checkout's
    # BLAS workers, which spin for about 0.1 s after a GEMM and would take a core from this update.
    t = time.perf_counter()
    while time.perf_counter() - t < 0.2:
        pass
    t = time.perf_counter()
    policy.update(net, 1, 0.5, np.random.default_rng(3), *extra)
    return time.perf_counter() - t, net


def compare(args, data, hidden):
    from ctre_edge import evolve, kernels, packed

    base = Path(args.base).resolve()
    if not (base / "ctre_edge" / "evolve.py").exists():
        raise SystemExit(f"--base: no ctre_edge/evolve.py in {base}")
    other = load_checkout(base)
    this = {"packed": packed, "evolve": evolve, "kernels": kernels}
    config = TrainConfig(hidden=hidden, method="ctre-sim", epsilon=args.epsilon, epochs=args.epochs, lr=0.01,
                         similarity_samples=args.samples)
    model = train(data, config).model
    rows = np.arange(data.X.shape[0])
    # The sample the update scores over (its rng draws it first), and how many neurons it leaves alive.
    levels = evolve.sample_activations(packed.PackedNet.from_layers(model.layers), data.X, rows, model.shift,
                                       model.scale, args.samples, np.random.default_rng(3))
    live = ", ".join(f"{level.live.shape[0]}/{level.inv.shape[0]}" for level in levels)
    print(f"base: {base}\n\nneurons not all zero over the sample, per level: {live}\n\nctre-sim update, exact "
          f"scoring, after {args.epochs} epochs; fastest of {args.passes} updates per checkout, alternating\n")
    print("| epsilon | this checkout ms | base ms | speed-up | same bits |")
    print("|---|---|---|---|---|")
    run = lambda m: timed_update(m, model.layers, config, data.X, rows, model.shift, model.scale)  # noqa: E731
    run(this), run(other)  # compile or load both
    times = {"this": [], "base": []}
    for _ in range(args.passes):
        a, mine = run(this)
        b, theirs = run(other)
        times["this"].append(a)
        times["base"].append(b)
    same = all(np.array_equal(x, y) for x, y in zip(mine, theirs))
    a, b = min(times["this"]), min(times["base"])
    print(f"| {args.epsilon:g} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x | {'yes' if same else 'no'} |")


def phases(args, data, hidden):
    import threading

    import numba

    from ctre_edge import evolve, kernels, packed, similarity

    config = TrainConfig(hidden=hidden, method="ctre-sim", epsilon=args.epsilon, epochs=args.epochs, lr=0.01,
                         similarity_samples=args.samples)
    model = train(data, config).model
    this = {"packed": packed, "evolve": evolve, "kernels": kernels}
    rows = np.arange(data.X.shape[0])
    spans = []  # (part, start, seconds, thread) of the current update, from every thread
    lock = threading.Lock()
    parts = [(evolve.TopologyPolicy, "update", "update"), (similarity, "_scan_topk", "gemm"),
             (evolve, "update_layer", "drops")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in parts]

    def timed(f, part):
        @functools.wraps(f)  # keeps the signature, which timed_update reads
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                with lock:
                    spans.append((part, t, time.perf_counter() - t, threading.get_ident()))
        return run

    per_pass = []
    try:
        for owner, name, part in parts:
            setattr(owner, name, timed(getattr(owner, name), part))
        timed_update(this, model.layers, config, data.X, rows, model.shift, model.scale)  # compile or load
        for _ in range(args.passes):
            spans.clear()
            timed_update(this, model.layers, config, data.X, rows, model.shift, model.scale)
            (start, total), = [(t, d) for q, t, d, _ in spans if q == "update"]
            scoring = [(t, t + d, th) for q, t, d, th in spans if q == "gemm"]
            # Scoring inside a drop and grow (layer by layer, each split over the threads) counts as
            # scoring, not as the drop's. Where the layers are scored whole, a layer drops and grows
            # on a scoring thread while the other may still score, and the sample's later levels are
            # computed while the first layer is scored: the parts overlap, so they are thread time.
            inside = sum(min(t0 + d, e) - max(t0, b) for q, t0, d, th in spans if q == "drops"
                         for b, e, on in scoring if on == th and b < t0 + d and e > t0)
            per_pass.append({"sample": min(b for b, _, _ in scoring) - start,
                             "gemm": sum(e - b for b, e, _ in scoring),
                             "drops": sum(d for q, _, d, _ in spans if q == "drops") - inside,
                             "total": total})
    finally:
        for owner, name, f in saved:
            setattr(owner, name, f)
    med = {key: statistics.median(p[key] for p in per_pass) * 1e3 for key in per_pass[0]}
    print(f"ctre-sim update, exact scoring, after {args.epochs} epochs, on {numba.get_num_threads()} thread(s); "
          f"medians of {args.passes} updates, ms per update\n")
    print("| part | ms |\n|---|---|")
    for key, label in (("sample", "activation sample until the first layer's scoring starts (wall)"),
                       ("gemm", "scoring: products and scans (thread time, summed over the calls)"),
                       ("drops", "drops and grows, without the scoring (thread time, summed)"),
                       ("total", "whole update (wall)")):
        print(f"| {label} | {med[key]:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_update_network_args(ap)
    ap.add_argument("--sketch-dim", type=int, default=256)
    ap.add_argument("--base", help="another checkout: time both checkouts' exact update in one process")
    ap.add_argument("--passes", type=int, default=15, help="with --base or --phases: updates per checkout")
    ap.add_argument("--phases", action="store_true", help="where this checkout's exact update spends its time")
    args = ap.parse_args(argv)
    data, hidden = load_update_network(args)
    print(machine_header())
    print(f"data {args.data}, {data.n_features}-{'-'.join(map(str, hidden))}-"
          f"{len(data.classes)}, epsilon {args.epsilon:g}, S = {args.samples}, sketch dim {args.sketch_dim}\n")
    if args.base:
        return compare(args, data, hidden)
    if args.phases:
        return phases(args, data, hidden)
    print("| scoring | epoch without update (s) | update (ms) | update / epoch |")
    print("|---|---|---|---|")
    for similarity in ("exact", "sketch"):
        config = TrainConfig(hidden=hidden, method="ctre-sim", similarity=similarity, epochs=args.epochs, lr=0.01,
                             epsilon=args.epsilon, similarity_samples=args.samples, sketch_dim=args.sketch_dim)
        history = train(data, config).history[1:-1]  # the first epoch compiles, the last has no update
        epoch = statistics.median(h.seconds - h.update_seconds for h in history)
        update = statistics.median(h.update_seconds for h in history)
        print(f"| {similarity} | {epoch:.3f} | {update * 1e3:.1f} | {update / epoch:.1%} |", flush=True)


if __name__ == "__main__":
    main()
