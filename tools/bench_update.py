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
and prints where one update's time goes (medians over the passes): the activation sample; the
scoring, its wall time and, summed over the calls, the GEMMs with their scans (where the layers are
scored whole, each call runs on one thread, so that is thread time; else each call splits its layer
over the threads); and the drops and grows without the scoring inside them.

    python -m tools.bench_update --data mnist.npz --phases [--epsilon 1] [--passes 15]
"""

import argparse
import importlib
import inspect
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ctre_edge.data import load_data
from ctre_edge.train import TrainConfig, train


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


def timed_update(modules, layers, config, X, rows, shift, scale):
    net = modules["packed"].PackedNet.from_layers(layers)
    policy = modules["evolve"].TopologyPolicy(config, X, rows, shift, scale)
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
    spans = []  # (part, start, seconds) of the current update, from every thread
    lock = threading.Lock()
    parts = [(evolve, "sample_activations", "sample"), (similarity, "_scan_topk", "gemm"),
             (evolve, "update_layer", "drops")]
    saved = [(module, name, getattr(module, name)) for module, name, _ in parts]

    def timed(f, part):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                with lock:
                    spans.append((part, t, time.perf_counter() - t))
        return run

    per_pass = []
    try:
        for module, name, part in parts:
            setattr(module, name, timed(getattr(module, name), part))
        timed_update(this, model.layers, config, data.X, rows, model.shift, model.scale)  # compile or load
        for _ in range(args.passes):
            spans.clear()
            total, _ = timed_update(this, model.layers, config, data.X, rows, model.shift, model.scale)
            sums = {part: sum(d for q, _, d in spans if q == part) for _, _, part in parts}
            # Scoring before the first drop (layers scored whole, all at once), and scoring inside a
            # drop and grow (layer by layer, each split over the threads): the latter's wall time is
            # the scoring's, not the drop's.
            sample_end = max((t + d for q, t, d in spans if q == "sample"), default=0.0)
            drops = [(t, t + d) for q, t, d in spans if q == "drops"]
            inside = []
            for t0, t1 in drops:
                scoring = [(t, t + d) for q, t, d in spans if q == "gemm" and t0 <= t <= t1]
                inside.append(max(e for _, e in scoring) - min(b for b, _ in scoring) if scoring else 0.0)
            sums["scoring wall"] = min((t0 for t0, _ in drops), default=sample_end) - sample_end + sum(inside)
            sums["drops"] -= sum(inside)
            sums["other"] = total - sums["sample"] - sums["scoring wall"] - sums["drops"]
            sums["total"] = total
            per_pass.append(sums)
    finally:
        for module, name, f in saved:
            setattr(module, name, f)
    med = {key: statistics.median(p[key] for p in per_pass) * 1e3 for key in per_pass[0]}
    whole = packed.scores_layers_whole(model.sizes, config.similarity_workspace_mib << 20, numba.get_num_threads())
    print(f"ctre-sim update, exact scoring, after {args.epochs} epochs, on {numba.get_num_threads()} thread(s); "
          f"medians of {args.passes} updates, ms per update; calls summed "
          f"({'thread time where the layers are scored whole' if whole else 'each call splits a layer'})\n")
    print("| part | ms |\n|---|---|")
    for key, label in (("sample", "activation sample: forward pass and norms (wall)"),
                       ("gemm", "scoring: GEMMs and scans (calls summed)"),
                       ("scoring wall", "scoring (wall)"),
                       ("drops", "drops and grows, without the scoring (wall)"),
                       ("other", "the rest: Python between the parts (wall)"), ("total", "whole update (wall)")):
        print(f"| {label} | {med[key]:.1f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="builtin:digits")
    ap.add_argument("--hidden", default="1000,1000,1000")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--epsilon", type=float, default=1.0)
    ap.add_argument("--samples", type=int, default=1000, help="S, samples for the cosine scores")
    ap.add_argument("--sketch-dim", type=int, default=256)
    ap.add_argument("--base", help="another checkout: time both checkouts' exact update in one process")
    ap.add_argument("--passes", type=int, default=15, help="with --base or --phases: updates per checkout")
    ap.add_argument("--phases", action="store_true", help="where this checkout's exact update spends its time")
    args = ap.parse_args(argv)
    data = load_data(args.data)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    print(f"{platform.machine()}, data {args.data}, {data.n_features}-{'-'.join(map(str, hidden))}-"
          f"{len(data.classes)}, epsilon {args.epsilon:g}, S = {args.samples}, sketch dim {args.sketch_dim}\n")
    if args.base:
        return compare(args, data, hidden)
    if args.phases:
        return phases(args, data, hidden)
    print("| scoring | epoch without update (s) | update (s) | update / epoch |")
    print("|---|---|---|---|")
    for similarity in ("exact", "sketch"):
        config = TrainConfig(hidden=hidden, method="ctre-sim", similarity=similarity, epochs=args.epochs, lr=0.01,
                             epsilon=args.epsilon, similarity_samples=args.samples, sketch_dim=args.sketch_dim)
        history = train(data, config).history[1:-1]  # the first epoch compiles, the last has no update
        epoch = statistics.median(h.seconds - h.update_seconds for h in history)
        update = statistics.median(h.update_seconds for h in history)
        print(f"| {similarity} | {epoch:.3f} | {update:.3f} | {update / epoch:.1%} |", flush=True)


if __name__ == "__main__":
    main()
