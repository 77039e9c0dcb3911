"""Fleet training against centralised training with the same total epochs, and bytes per round.

Runs ``ctre-edge fleet simulate --json`` (a real SuperLink and N SuperNodes on 127.0.0.1, every
byte counted at the socket by a relay in front of each SuperNode) for each partition x rule x
method asked for, and ``ctre-edge train --json`` once per method with epochs = rounds x local
epochs, then prints one table. Usage::

    python -m tools.fleet_bench --data mnist.npz --clients 10 --rounds 30 --partitions iid,dirichlet:0.3
    python -m tools.fleet_bench --data builtin:digits --clients 3 --rounds 8 --hidden 64,64 --epsilon 4 \\
        --lr 0.2 --rules regrow,feddst --methods set,ctre-sim

``--in-process ROWS`` is the cheap proxy for trying aggregation settings: the same client training
(``train`` from the global model), votes and ``aggregate`` in one process, without Flower (so no
bytes), on the first ROWS of a random permutation of the training rows; ``--variants`` lists fleet
option sets separated by ``;``, each run for every partition::

    python -m tools.fleet_bench --data mnist.npz --clients 10 --rounds 10 --methods ctre-sim --in-process 20000 \\
        --variants "--batch-size 100 --server-momentum 0;--batch-size 10 --server-momentum 0.5"
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run(args: list[str]) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "ctre_edge.cli", *args], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode:
        sys.exit(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    doc = json.loads(r.stdout)
    doc["wall_seconds"] = time.perf_counter() - t0
    return doc


def in_process(a) -> None:
    """The proxy: one row per partition x variant, against centralised training on the same rows."""
    import numpy as np

    from ctre_edge.data import Dataset, fit_scaling, load_data
    from ctre_edge.fleet.aggregate import ServerMomentum, aggregate
    from ctre_edge.fleet.apps import _votes
    from ctre_edge.fleet.cli import SERVER_MOMENTUM, local_batch_size
    from ctre_edge.fleet.partition import assign, parse_partition
    from ctre_edge.model import SparseMLP
    from ctre_edge.train import TrainConfig, init_layers, train

    vp = argparse.ArgumentParser(prog="variant")
    vp.add_argument("--batch-size", type=int)
    vp.add_argument("--server-momentum", type=float, default=SERVER_MOMENTUM)
    vp.add_argument("--server-lr", type=float, default=1.0)
    vp.add_argument("--local-epochs", type=int, default=a.local_epochs)
    vp.add_argument("--rounds", type=int, default=a.rounds)
    vp.add_argument("--rule", default="regrow")
    data = load_data(a.data)
    rng = np.random.default_rng([int(a.seed), 14])
    rows = np.sort(rng.permutation(data.X.shape[0])[:a.in_process])
    X, y = data.X[rows], data.y[rows]
    hidden = tuple(int(h) for h in a.hidden.split(","))
    shift, scale = fit_scaling(X, np.arange(X.shape[0]), "auto")
    print(f"in-process proxy: data {a.data}, {rows.shape[0]} training rows, {a.clients} clients, hidden {a.hidden}, "
          f"epsilon {a.epsilon}, lr {a.lr}, seed {a.seed}; test on the data's test split")
    print(f"{'partition':>15} {'method':>9} {'variant':>52} {'test acc':>9} {'gap pp':>7} {'s':>5}")
    for method in a.methods.split(","):
        base = dict(hidden=hidden, method=method, epsilon=float(a.epsilon), lr=float(a.lr), seed=int(a.seed))
        t0 = time.perf_counter()
        epochs = a.rounds * a.local_epochs
        res = train(Dataset(X, y, data.classes, X_test=data.X_test, y_test=data.y_test),
                    TrainConfig(**base, epochs=epochs, early_stop=0))
        central = res.test_accuracy
        print(f"{'centralised':>15} {method:>9} {f'{epochs} epochs, batch 100':>52} {central:>9.4f} {'':>7} "
              f"{time.perf_counter() - t0:>5.0f}")
        for partition in a.partitions.split(","):
            kind, alpha = parse_partition(partition)
            parts = assign(y, a.clients, kind, alpha, np.random.default_rng([int(a.seed), 14, 1]))
            for variant in a.variants.split(";"):
                v = vp.parse_args(variant.split())
                t0 = time.perf_counter()
                sizes = [X.shape[1], *hidden, len(data.classes)]
                glob = init_layers(sizes, float(a.epsilon), np.random.default_rng(int(a.seed)), "sparse")
                targets = [layer.nnz for layer in glob]
                server = ServerMomentum(v.server_lr, v.server_momentum)
                cfg_base = dict(base, batch_size=local_batch_size(v.batch_size, a.clients))
                for r in range(1, v.rounds + 1):
                    models, weights, votes = [], [], []
                    for k, part in enumerate(parts):
                        client = Dataset(X[part], y[part], data.classes)
                        cfg = TrainConfig(**dict(cfg_base, seed=int(a.seed) * 1_000_003 + r * 7919 + k + 1),
                                          epochs=v.local_epochs, test_fraction=0.0, early_stop=0).validate()
                        local = train(client, cfg, start_from=SparseMLP(glob, shift, scale, data.classes)).model
                        models.append(local.layers)
                        weights.append(local.metrics["train_samples"])
                        votes.append(_votes(local, client, cfg, {"rule": v.rule}) if method.startswith("ctre")
                                     and v.rule == "regrow" else [np.empty(0, np.int64)] * len(glob))
                    glob = aggregate(models, weights, targets, rule=v.rule, zeta=TrainConfig().zeta, votes=votes,
                                     rng=np.random.default_rng([int(a.seed), r]), start=glob, server=server)
                model = SparseMLP(glob, shift, scale, data.classes)
                acc = float(np.mean(np.argmax(model.predict_proba(data.X_test), axis=1) == data.y_test))
                label = (f"{v.rule}, {v.rounds} x {v.local_epochs}, batch {cfg_base['batch_size']}, "
                         f"server m {v.server_momentum:g} lr {v.server_lr:g}")
                print(f"{partition:>15} {method:>9} {label:>52} {acc:>9.4f} {100 * (central - acc):>+7.2f} "
                      f"{time.perf_counter() - t0:>5.0f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="builtin:digits")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--hidden", default="1000,1000,1000")
    p.add_argument("--epsilon", default="1")
    p.add_argument("--lr", default="0.05")
    p.add_argument("--seed", default="0")
    p.add_argument("--partitions", default="iid")
    p.add_argument("--rules", default="regrow")
    p.add_argument("--methods", default="set")
    p.add_argument("--extra", default="", help="More options for both commands, space-separated.")
    p.add_argument("--fleet-extra", default="", help="More options for fleet simulate only, e.g. "
                   "'--server-momentum 0 --batch-size 100'.")
    p.add_argument("--in-process", type=int, default=0, metavar="ROWS",
                   help="Run the in-process proxy on ROWS training rows instead (no Flower, no bytes).")
    p.add_argument("--variants", default="", help="With --in-process: fleet option sets separated by ';'.")
    a = p.parse_args()
    if a.in_process:
        return in_process(a)
    common = ["--hidden", a.hidden, "--epsilon", a.epsilon, "--lr", a.lr, "--seed", a.seed, *a.extra.split()]
    rows = []
    for method in a.methods.split(","):
        epochs = a.rounds * a.local_epochs
        c = run(["train", "--data", a.data, "--method", method, "--epochs", str(epochs), "--no-checkpoint", "--json",
                 *common])
        rows.append(("centralised", method, f"b{(c.get('config') or {}).get('batch_size') or c.get('batch_size', '?')}", f"{epochs} epochs", c["test_accuracy"],
                     None, None, None,
                     c["wall_seconds"]))
        for partition in a.partitions.split(","):
            for rule in a.rules.split(","):
                f = run(["fleet", "simulate", "--clients", str(a.clients), "--data", a.data, "--partition", partition,
                         "--rounds", str(a.rounds), "--local-epochs", str(a.local_epochs), "--rule", rule,
                         "--method", method, "--json", *common, *a.fleet_extra.split()])
                h = f["history"]
                down = sum(x["socket_down"] for x in h) / len(h)
                up = sum(x["socket_up"] for x in h) / len(h)
                label = f"{rule} b{f['batch_size']} m{f['server_momentum']:g}" + \
                    (f" lr{f['server_lr']:g}" if f["server_lr"] != 1 else "")
                msg_up = sum(x["payload_up"] / max(1, x["replies"]) for x in h) / len(h)
                rows.append((partition, method, label, f"{a.rounds} x {a.local_epochs}", f["test_accuracy"],
                             (down, up, msg_up), f["payload_floor_bytes"], f["dense_fedavg_bytes"], f["wall_seconds"], f))
    print(f"data {a.data}, {a.clients} clients, hidden {a.hidden}, epsilon {a.epsilon}, lr {a.lr}, seed {a.seed}")
    print(f"{'partition':>15} {'method':>9} {'rule, batch, server m':>22} {'epochs':>10} {'test acc':>9} "
          f"{'KB down/up':>12} {'msg up KB':>9} {'x floor down/up':>15} {'dense / down, up':>16} {'wall s':>7}")
    central = {r[1]: r[4] for r in rows if r[0] == "centralised"}
    for r in rows:
        gap = "" if r[0] == "centralised" else f"  (gap {100 * (central[r[1]] - r[4]):+.2f} pp)"
        if r[5] is None:
            kb, msg, floor, dense = "-", "-", "-", "-"
        else:
            (down, up, msg_up), fl, de = r[5], r[6], r[7]
            kb, msg = f"{down / 1e3:.1f}/{up / 1e3:.1f}", f"{msg_up / 1e3:.1f}"
            floor, dense = f"{down / fl:.2f}/{up / fl:.2f}", f"{de / down:.0f}x, {de / up:.0f}x"
        print(f"{r[0]:>15} {r[1]:>9} {r[2]:>22} {r[3]:>10} {r[4]:>9.4f} {kb:>12} {msg:>9} {floor:>15} {dense:>16} "
              f"{r[8]:>7.0f}{gap}")
    fleet = [r[9] for r in rows if r[5] is not None]
    if fleet:
        f = fleet[0]
        print(f"payload floor {f['payload_floor_bytes']} B (connections x (2 + 4) + biases x 4); dense FedAvg "
              f"{f['dense_fedavg_bytes']} B per client per direction; socket bytes are means per client per round; "
              f"Flower's own count for the first run: {f['flower_traffic']}")


if __name__ == "__main__":
    main()
