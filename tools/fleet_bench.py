"""Fleet training against centralised training with the same total epochs, and bytes per round.

Runs ``ctre-edge fleet simulate --json`` (a real SuperLink and N SuperNodes on 127.0.0.1, every
byte counted at the socket by a relay in front of each SuperNode) for each partition x rule x
method asked for, and ``ctre-edge train --json`` once per method with epochs = rounds x local
epochs, then prints one table. Usage::

    python -m tools.fleet_bench --data mnist.npz --clients 10 --rounds 30 --partitions iid,dirichlet:0.3
    python -m tools.fleet_bench --data builtin:digits --clients 3 --rounds 8 --hidden 64,64 --epsilon 4 \\
        --lr 0.2 --rules regrow,feddst --methods set,ctre-sim
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
    a = p.parse_args()
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
                rows.append((partition, method, label, f"{a.rounds} x {a.local_epochs}", f["test_accuracy"],
                             down / f["payload_floor_bytes"], up / f["payload_floor_bytes"],
                             f["dense_fedavg_bytes"] / max(down, up), f["wall_seconds"]))
                rows[-1] += (f,)
    print(f"data {a.data}, {a.clients} clients, hidden {a.hidden}, epsilon {a.epsilon}, lr {a.lr}, seed {a.seed}")
    print(f"{'partition':>15} {'method':>9} {'rule, batch, server m':>22} {'epochs':>10} {'test acc':>9} {'down/floor':>11} "
          f"{'up/floor':>9} {'dense/max':>10} {'wall s':>8}")
    central = {r[1]: r[4] for r in rows if r[0] == "centralised"}
    for r in rows:
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        gap = "" if r[0] == "centralised" else f"  (gap {100 * (central[r[1]] - r[4]):+.2f} pp)"
        print(f"{r[0]:>15} {r[1]:>9} {r[2]:>22} {r[3]:>10} {r[4]:>9.4f} {fmt(r[5], '.2f'):>11} {fmt(r[6], '.2f'):>9} "
              f"{fmt(r[7], '.0f'):>10} {r[8]:>8.0f}{gap}")
    fleet = [r[9] for r in rows if len(r) > 9]
    if fleet:
        f = fleet[0]
        print(f"payload floor {f['payload_floor_bytes']} B (connections x (2 + 4) + biases x 4); dense FedAvg "
              f"{f['dense_fedavg_bytes']} B per client per direction; socket bytes are means per client per round; "
              f"Flower's own count for the first run: {f['flower_traffic']}")


if __name__ == "__main__":
    main()
