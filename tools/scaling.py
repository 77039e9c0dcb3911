"""Time and peak memory per epoch as the hidden width grows to a million neurons, against the Pi 4 2 GB profile.

For each width h, a 784-h-h-h-10 network (--layers hidden layers) at epsilon 1 is trained with SET on
synthetic MNIST-shaped uint8 data (60,000 x 784, 10 classes; 90% training, 10% validation, no test
pass), each width in its own subprocess so its peak RSS (``resource.getrusage``) is its own. Where an
epoch would take longer than --epoch-budget seconds, a fixed time's worth of batches (and validation
rows) is run and the epoch extrapolated linearly (see ``TimeBox`` in ``tools/_common.py``); the topology
update always runs whole.

Next to the measurement, the planner (``ctre_edge.budget``):

- predicted peak of the run as measured, to compare with the measured peak;
- the ``rpi-4b-2gb`` profile: ``plan_run(..., fit=True)`` (its caps on width and parameters, then its
  training budget, shrinking the batch, evaluation batch and similarity samples until the plan fits),
  and, since the profile's width cap refuses wide layers before memory is even looked at, the memory
  verdict alone (``fit_to_budget`` against the profile's training budget).

A width whose default settings (batch 100, evaluation batch 1000) do not fit the Pi's training budget
is measured with the settings the planner fitted, so the measured peak says whether the run really
stays under the Pi's budget. Times are this machine's, not a Pi's.

    python -m tools.scaling [--quick] [--widths 1000,10000,100000,1000000] [--layers 3] [--plot scaling.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools import _common as bt
from tools.bench_train import ctre_run

PROFILE = "rpi-4b-2gb"
MiB = 1 << 20


def run_config(width: int, layers: int, batch: int = 100, eval_batch: int = 1000, epochs: int = 1):
    from ctre_edge.train import TrainConfig

    return TrainConfig(hidden=(width,) * layers, method="set", epsilon=1.0, epochs=epochs + 1, lr=0.01,
                       batch_size=batch, eval_batch_size=eval_batch, seed=0, test_fraction=0.0).validate()


def data_summary(n: int):
    """What the planner knows of the synthetic data set of ``n`` rows: uint8 X plus int64 labels."""
    from ctre_edge.data import DataSummary

    return DataSummary(n, 784, 10, 0, n * 784 + n * 8)


def plan_width(width: int, layers: int, n: int) -> dict:
    """Planner verdicts for one width: default prediction, the Pi profile with --fit, and its memory alone."""
    from ctre_edge.budget import fit_to_budget, plan_run, plan_training, shape_of
    from ctre_edge.errors import CtreError
    from ctre_edge.profiles import load_profile

    profile = load_profile(PROFILE)
    summary = data_summary(n)
    config = run_config(width, layers)
    default = plan_training(shape_of(config, summary))
    try:
        _, pi = plan_run(run_config(width, layers), summary, profile, fit=True)
        pi_verdict, pi_refusal = "fits" + (f" ({', '.join(pi.changes)})" if pi.changes else ""), None
    except CtreError as e:
        pi_verdict, pi_refusal = "refused", str(e)
    shape = shape_of(config, summary)
    shape.similarity_samples = min(shape.similarity_samples, profile.similarity_sample_cap)
    fitted, memory_plan = fit_to_budget(shape, profile.train_budget_bytes, profile.name)
    return {"default_bytes": default.total, "pi_verdict": pi_verdict, "pi_refusal": pi_refusal,
            "pi_memory_fits": memory_plan.fits, "pi_memory_bytes": memory_plan.total,
            "pi_changes": memory_plan.changes, "fitted_batch": fitted.batch_size,
            "usable_bytes": int(getattr(memory_plan, "headroom", 1.0) * profile.train_budget_bytes),
            "fitted_eval_batch": fitted.eval_batch_size, "budget_bytes": profile.train_budget_bytes,
            "nnz": sum(shape.nnz)}


def child(spec: dict) -> dict:
    """One measured run (in its own process): synthetic data, ``train`` under a TimeBox, the planner's view."""
    from ctre_edge.budget import plan_training, shape_of
    from ctre_edge.data import summarize_loaded

    data = bt.synthetic_mnist(spec["n"])
    config = run_config(spec["width"], spec["layers"], spec["batch"], spec["eval_batch"], spec["epochs"])
    predicted = plan_training(shape_of(config, summarize_loaded(data), data.nbytes)).total
    out = ctre_run(data, config, timed_epochs=spec["epochs"], train_budget=spec["budget"],
                      val_budget=None if spec["budget"] is None else spec["budget"] / 3)
    out["predicted_bytes"] = predicted
    out["peak_rss_bytes"] = bt.peak_rss_bytes()
    return out


def mib(b) -> str:
    return f"{b / MiB:,.0f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="1000,3000,10000,30000,100000,300000,1000000")
    ap.add_argument("--layers", type=int, default=3, help="hidden layers of width h")
    ap.add_argument("--samples", type=int, default=60000, help="rows of the synthetic data set")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per width (each with its topology update)")
    ap.add_argument("--epoch-budget", type=float, default=60.0,
                    help="seconds of training batches per epoch before extrapolating (validation: a third)")
    ap.add_argument("--memory-fraction", type=float, default=0.6,
                    help="do not run a width whose predicted peak exceeds this fraction of MemAvailable")
    ap.add_argument("--plot", help="write a PNG of time and memory against width (needs matplotlib)")
    ap.add_argument("--quick", action="store_true", help="widths 1000,10000,100000,1000000; 1 epoch; 20 s budget")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.quick:
        args.widths, args.epochs, args.epoch_budget = "1000,10000,100000,1000000", 1, 20.0
    if args.smoke:
        args.widths, args.layers, args.samples, args.epochs, args.epoch_budget = "64", 1, 1000, 1, 2.0
    widths = [int(w) for w in args.widths.split(",")]

    from ctre_edge.profiles import load_profile

    profile = load_profile(PROFILE)
    bt.warm_kernel_cache()
    print(bt.machine_header())
    print(f"network: 784-{'-'.join(['h'] * args.layers)}-10, epsilon 1, SET, lr 0.01; synthetic uint8 data "
          f"{args.samples} x 784 (90% training, 10% validation); {args.epochs} timed epoch(s) per width, median; "
          f"epoch budget {args.epoch_budget:g} s of training batches, then extrapolated")
    from ctre_edge import budget

    headroom = getattr(budget, "TRAINING_HEADROOM", 1.0)
    print(f"profile {PROFILE}: training budget {profile.train_budget_bytes / MiB:,.0f} MiB (the planner fits runs "
          f"within {headroom:.0%} of it, {headroom * profile.train_budget_bytes / MiB:,.0f} MiB), width cap "
          f"{profile.max_layer_width:,}, parameter cap {profile.max_params:,}, similarity samples "
          f"{profile.similarity_sample_cap:,}; times below are this machine's, not a Pi's\n")
    head = ["h", "connections", "batch / eval batch", "s/epoch", "measured peak MiB", "predicted peak MiB",
            "measured / predicted", "default settings: predicted MiB", f"{PROFILE} (plan_run --fit)",
            f"{PROFILE} memory alone", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    avail = bt.meminfo("MemAvailable") or 0
    points = []
    for width in widths:
        p = plan_width(width, args.layers, args.samples)
        notes = []
        if not p["pi_changes"] or not p["pi_memory_fits"]:
            batch, eval_batch, predicted_run = 100, 1000, p["default_bytes"]
        else:
            batch, eval_batch, predicted_run = p["fitted_batch"], p["fitted_eval_batch"], p["pi_memory_bytes"]
            notes.append("measured with the Pi's fitted batch sizes")
        memory_alone = (f"fits, {mib(p['pi_memory_bytes'])} MiB" + (f" with {', '.join(p['pi_changes'])}"
                                                                      if p["pi_changes"] else "")
                        if p["pi_memory_fits"] else f"does not fit ({mib(p['pi_memory_bytes'])} MiB at the floors)")
        pi = p["pi_verdict"] if p["pi_refusal"] is None else f"refused: {p['pi_refusal']}"
        base = [f"{width:,}", f"{p['nnz']:,}", f"{batch} / {eval_batch}"]
        tail = [mib(p["default_bytes"]), pi, memory_alone]
        if avail and predicted_run > args.memory_fraction * avail:
            print("| " + " | ".join(base + ["-", "-", mib(predicted_run), "-"] + tail
                                    + [f"not run: predicted peak above {args.memory_fraction:.0%} of MemAvailable"])
                  + " |", flush=True)
            continue
        res = bt.run_child("scaling", {"width": width, "layers": args.layers, "n": args.samples, "batch": batch,
                            "eval_batch": eval_batch, "epochs": args.epochs, "budget": args.epoch_budget})
        if "error" in res:
            print("| " + " | ".join(base + ["-", "-", mib(predicted_run), "-"] + tail + [f"failed: {res['error']}"])
                  + " |", flush=True)
            continue
        mid = bt.epoch_median(res["history"])
        if mid["batches"] < mid["batches_total"] or mid["val_samples"] < mid["val_total"]:
            notes.append(f"extrapolated from {mid['batches']}/{mid['batches_total']} batches and "
                         f"{mid['val_samples']}/{mid['val_total']} validation rows")
        notes.append(f"update {mid['update_seconds']:.2f} s")
        measured, predicted = res["peak_rss_bytes"], res["predicted_bytes"]
        if p["pi_changes"]:
            notes.append("measured peak " + ("within" if measured <= p["budget_bytes"] else "ABOVE")
                         + f" the {mib(p['budget_bytes'])} MiB Pi budget and "
                         + ("within" if measured <= p["usable_bytes"] else "ABOVE")
                         + f" the {mib(p['usable_bytes'])} MiB the planner allows itself")
        print("| " + " | ".join(base + [bt.fmt_seconds(mid["epoch_seconds"]), mib(measured), mib(predicted),
                                        f"{measured / predicted:.2f}"] + tail + ["; ".join(notes)]) + " |",
              flush=True)
        points.append((width, mid["epoch_seconds"], measured / MiB, predicted / MiB))
    if args.plot:
        write_plot(points, args.plot, profile.train_budget_bytes / MiB)


def write_plot(points, path, budget_mib) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\nmatplotlib is not importable: no plot written")
        return
    if not points:
        return
    w, t, m, p = zip(*points)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.loglog(w, t, "o-")
    a1.set_xlabel("hidden width h")
    a1.set_ylabel("seconds per epoch")
    a2.loglog(w, m, "o-", label="measured peak")
    a2.loglog(w, p, "x--", label="predicted peak")
    a2.axhline(budget_mib, color="gray", linestyle=":", label=f"{PROFILE} training budget")
    a2.set_xlabel("hidden width h")
    a2.set_ylabel("MiB")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nplot written to {Path(path).name}")


if __name__ == "__main__":
    main()
