"""``ctre-edge fleet``: server, client and simulate. Imports no Flower module itself.

``server`` runs a SuperLink and the fleet run on it; ``client`` checks that the device can hold
the run, then becomes a SuperNode; ``simulate`` partitions one data file, starts a SuperLink and
N SuperNodes on 127.0.0.1 as separate processes (each behind a relay that counts its bytes at
the socket) and prints per-round progress and a final table, then stops every process it started.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import run
from ..cli_common import parse_hidden, run_command
from ..config import TrainConfig
from ..console import err, print_json
from ..errors import ConfigError, CtreError, OutputExistsError

_D = TrainConfig()  # the training defaults, shared with `ctre-edge train`

INSTALL_HINT = "fleet training needs Flower: pip install 'ctre-edge[fleet]' (Python >= 3.11)"

fleet_app = typer.Typer(no_args_is_help=True,
                        help="Train one sparse model across many devices over Flower (needs the 'fleet' extra).")


def require_flwr() -> None:
    try:
        found = sys.version_info >= (3, 11) and importlib.util.find_spec("flwr") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        err.print("[red]error:[/red] ", end="")
        err.print(INSTALL_HINT, markup=False)  # the brackets of [fleet] are not markup
        raise typer.Exit(ConfigError.exit_code)


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so every process this command started is stopped on the way out."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        pass


# Options shared by server and simulate: the run's training settings.
Method = Annotated[str, typer.Option(help="Topology policy on the clients: static, set, ctre-sim or ctre-seq (ctre-* also vote for growth).")]
Hidden = Annotated[str, typer.Option(help="Hidden layer widths, comma-separated.")]
Epsilon = Annotated[float, typer.Option(help="Erdos-Renyi sparsity: eps*(n_in+n_out) connections per layer.")]
Zeta = Annotated[float, typer.Option(help="Fraction of connections dropped and regrown (per local epoch and per round).")]
Rounds = Annotated[int, typer.Option(help="Federated rounds.")]
LocalEpochs = Annotated[int, typer.Option(help="Epochs each client trains per round.")]
BatchSize = Annotated[int, typer.Option(help="Minibatch size.")]
LocalBatchSize = Annotated[Optional[int], typer.Option("--batch-size", help="Minibatch size on each client (default: the centralised batch size divided by the clients, at least 1: on an even split each client then takes as many SGD steps per local epoch as centralised training per epoch).")]
ServerLr = Annotated[float, typer.Option(help="Server learning rate: the global model moves by this times the (momentum) averaged update; 1 with momentum 0 is plain FedAvg.")]
ServerMomentumOpt = Annotated[float, typer.Option("--server-momentum", help="Server momentum on each connection's averaged update (FedAvgM); 0 for none.")]
Lr = Annotated[float, typer.Option(help="Learning rate.")]
Seed = Annotated[int, typer.Option(help="Random seed of the initial model and of every client's round.")]
Rule = Annotated[str, typer.Option(help="Aggregation: regrow (union, magnitude cut, grow by votes or at random) or feddst (union, magnitude cut).")]
MinReplies = Annotated[Optional[int], typer.Option(help="Valid replies a round needs to count (default: half the clients, at least 1).")]
RoundTimeout = Annotated[float, typer.Option(help="Seconds a round waits for slow clients before aggregating what came.")]
ValueDtype = Annotated[str, typer.Option(help="Weights on the wire: float32 or float16.")]
SimilaritySamples = Annotated[int, typer.Option(help="Training samples S for the cosine scores of ctre-* methods.")]


SERVER_MOMENTUM = 0.5  # measured best of 0, 0.3, 0.5, 0.7, 0.9 (docs/fleet.md)


def local_batch_size(batch_size: int | None, clients: int) -> int:
    """The clients' minibatch: as given, or the centralised one divided by the fleet size."""
    return batch_size if batch_size is not None else max(1, round(_D.batch_size / max(1, clients)))


def _train_settings(method, hidden, epsilon, zeta, batch_size, lr, seed, similarity_samples) -> dict:
    from ..train import TrainConfig

    config = TrainConfig(hidden=parse_hidden(hidden), method=method, epsilon=epsilon, zeta=zeta,
                         batch_size=batch_size, lr=lr, seed=seed, similarity_samples=similarity_samples)
    return config.validate().to_dict()


def _prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    from .state import CHECKPOINT

    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise ConfigError(f"--resume: {run_dir} has no fleet checkpoint ({CHECKPOINT}); start without --resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise OutputExistsError(f"{run_dir} is not empty; pass --force to start over or --resume to continue")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def _read_progress(run_dir: Path):
    from ..errors import ModelFileError  # with state below: loaded only when a run's progress is read
    from .state import read_checkpoint

    try:
        return read_checkpoint(run_dir)
    except ModelFileError:
        return None  # being replaced right now: read it on the next poll


@fleet_app.command()
def server(
    dir: Annotated[Path, typer.Option("--dir", help="Run directory: settings, logs and the checkpoint of every round.")] = Path("fleet-run"),
    rounds: Rounds = 20,
    local_epochs: LocalEpochs = 1,
    min_clients: Annotated[int, typer.Option(help="Clients that must join before the first round.")] = 2,
    min_replies: MinReplies = None,
    round_timeout: RoundTimeout = 600.0,
    join_timeout: Annotated[float, typer.Option(help="Seconds to wait for --min-clients to join.")] = 3600.0,
    rule: Rule = "regrow",
    method: Method = _D.method,
    hidden: Hidden = ",".join(map(str, _D.hidden)),
    epsilon: Epsilon = _D.epsilon,
    zeta: Zeta = _D.zeta,
    batch_size: LocalBatchSize = None,
    lr: Lr = _D.lr,
    seed: Seed = _D.seed,
    similarity_samples: SimilaritySamples = _D.similarity_samples,
    server_lr: ServerLr = 1.0,
    server_momentum: ServerMomentumOpt = SERVER_MOMENTUM,
    value_dtype: ValueDtype = "float32",
    host: Annotated[str, typer.Option(help="Address the SuperLink listens on (0.0.0.0 for a real fleet).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="SuperLink port (Fleet and Control API over HTTP).")] = 9092,
    ssl_certfile: Annotated[Optional[Path], typer.Option(help="TLS certificate of the SuperLink (with --ssl-keyfile); without it the link is unencrypted.")] = None,
    ssl_keyfile: Annotated[Optional[Path], typer.Option(help="TLS private key of the SuperLink.")] = None,
    ssl_ca_certfile: Annotated[Optional[Path], typer.Option(help="CA certificate that signed --ssl-certfile.")] = None,
    enable_supernode_auth: Annotated[bool, typer.Option("--enable-supernode-auth", help="Accept only SuperNodes registered with `flwr supernode register`.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --dir after its last checkpointed round.")] = False,
    force: Annotated[bool, typer.Option(help="Start over in a --dir that holds a run.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the final global model here.")] = None,
):
    """Run the SuperLink and the fleet run; clients join with `ctre-edge fleet client`."""
    require_flwr()

    def body():
        from .runner import Server, make_settings

        if out is not None and out.exists() and not force:
            run.check_output(out, force=False)
        if (ssl_certfile is None) != (ssl_keyfile is None):
            raise ConfigError("--ssl-certfile and --ssl-keyfile go together")
        train = _train_settings(method, hidden, epsilon, zeta, local_batch_size(batch_size, min_clients), lr, seed,
                                similarity_samples)
        _prepare_run_dir(dir, resume, force)
        settings = make_settings(dir, train=train, rounds=rounds, local_epochs=local_epochs, rule=rule,
                                 min_clients=min_clients, min_replies=min_replies or max(1, min_clients // 2),
                                 round_timeout=round_timeout, join_timeout=join_timeout, value_dtype=value_dtype,
                                 resume=resume, server_lr=server_lr, server_momentum=server_momentum)
        for path in (ssl_certfile, ssl_keyfile, ssl_ca_certfile):
            if path is not None and not path.is_file():
                raise ConfigError(f"TLS file {path} not found")
        tls = None if ssl_certfile is None else {
            "certfile": str(ssl_certfile.resolve()), "keyfile": str(ssl_keyfile.resolve()),
            "ca_certfile": str(ssl_ca_certfile.resolve()) if ssl_ca_certfile else None}
        srv = Server(dir, host, port, tls, enable_supernode_auth)
        _stop_on_sigterm()
        if resume:
            err.print(f"resuming after round {_read_progress(dir).metrics['round']} of {rounds}")
        try:
            srv.start()
            run_id = srv.submit()
            err.print(f"fleet run {run_id} on {host}:{port}; clients join with: ctre-edge fleet client "
                          f"--superlink HOST:{port} --data FILE" + ("" if tls else " --insecure"))
            model = _follow(srv, settings, lambda h, m: err.print(_round_line(h, settings["rounds"])))
        finally:
            srv.stop()
        if out is not None:
            model.save(out, force=force)
        err.print(f"fleet run finished: {model.metrics['round']} rounds; global model in {dir / 'global.ctre'}"
                      + (f" and {out}" if out is not None else ""))

    run_command(body)


def _follow(srv, settings: dict, on_round, poll: float = 0.5, on_first=None):
    """Report each new checkpointed round until the run is over; the final model, or FleetError.

    ``on_first(model)`` is called when the first checkpoint appears (the setup is done).
    """
    from .runner import FleetError  # the process runner loads only for commands that start a run

    seen = None
    last_status = time.monotonic()
    model = None
    completed = False
    while True:
        m = _read_progress(Path(settings["run_dir"]))
        if m is not None:
            model = m
            r = int(m.metrics["round"])
            if seen is None:
                seen = r  # rounds before a resume were reported by the previous server
                if on_first is not None:
                    on_first(m)
            while seen < r:
                seen += 1
                on_round(m.metrics["history"][seen - 1], m)
            if m.metrics.get("done") and r >= settings["rounds"]:
                return m
        if completed:
            return model
        if not srv.alive():
            raise FleetError(f"flower-superlink exited (code {srv.proc.returncode}); see {srv.run_dir / 'superlink.log'}")
        if time.monotonic() - last_status > 10:
            last_status = time.monotonic()
            doc = srv.status()
            status = str(doc.get("status", ""))
            if status.startswith("finished") and status != "finished:completed":
                raise FleetError(_failed_run(srv, status, str(doc.get("status-details") or "")))
            if status == "finished:completed" and model is not None:
                # One more pass: the last round's checkpoint may have been written after it was read.
                completed = True
                continue
        time.sleep(poll)


def _failed_run(srv, status: str, details: str = "") -> str:
    """Why the run failed, in one line: Flower's status details (e.g. the run expired because the
    ServerApp stopped sending heartbeats) and the last error line of the ServerApp's log, which is
    kept in serverapp-RUNID.log."""
    from ..fileio import atomic_write  # as _follow's import: only for commands that start a run

    log = re.sub(r"\x1b\[[0-9;]*m", "", srv.server_log())  # Flower colours its log levels
    where = srv.run_dir / "superlink.log"
    # One file per Flower run id: a resumed run is a new Flower run, and the earlier log stays.
    path = srv.run_dir / f"serverapp-{srv.run_id}.log"
    if log.strip():
        try:
            where = atomic_write(path, lambda f: f.write(log.encode()))
        except CtreError:  # it exists, or the disk refuses: the failure is still reported, with superlink.log
            pass
    # The last line of the last traceback ("ValueError: ..."), which Flower's details may not carry.
    errors = [ln.strip() for ln in log.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception|Exit)\b\S*: ", ln)]
    reasons = [details.strip()] if details.strip() else []
    reasons += [errors[-1][-300:]] if errors and errors[-1].split(": ", 1)[1] not in details else []
    reason = f" ({'; '.join(reasons)})" if reasons else ""
    return f"the fleet run ended with status {status}{reason}; see {where}"


def _round_line(h: dict, rounds: int, extra: str = "") -> str:
    return (f"round {h['round']}/{rounds}: {h['replies']}/{h['sent']} replies, clients' validation accuracy "
            f"{h['val_after']:.4f} (global model before the round {h['val_before']:.4f}), "
            f"payload {h['payload_down'] / h['sent'] / 1e3:.1f} KB down, "
            f"{h['payload_up'] / max(1, h['replies']) / 1e3:.1f} KB up per client, {h['seconds']:.1f} s{extra}")


@fleet_app.command()
def client(
    data: Annotated[str, typer.Option(help="This device's training data (any `train --data` format).")],
    superlink: Annotated[str, typer.Option(help="The server's address, HOST:PORT.")] = "127.0.0.1:9092",
    profile: Annotated[Optional[str], typer.Option(help="Device profile: refuse a run that does not fit, and use its thread count.")] = None,
    method: Method = _D.method,
    hidden: Hidden = ",".join(map(str, _D.hidden)),
    epsilon: Epsilon = _D.epsilon,
    batch_size: BatchSize = _D.batch_size,
    similarity_samples: SimilaritySamples = _D.similarity_samples,
    state_dir: Annotated[Optional[Path], typer.Option(help="Where this node keeps the run's input scaling (default: DATA.fleet next to --data).")] = None,
    port: Annotated[int, typer.Option(help="Local port of this SuperNode's ClientApp API (one per node on a machine).")] = 9094,
    insecure: Annotated[bool, typer.Option("--insecure", help="Connect without TLS (the server runs without --ssl-certfile).")] = False,
    root_certificates: Annotated[Optional[Path], typer.Option(help="CA certificate to verify the server's TLS certificate.")] = None,
    auth_private_key: Annotated[Optional[Path], typer.Option(help="This node's private key for SuperNode authentication.")] = None,
):
    """Check that this device can hold the run, then join the fleet as a Flower SuperNode."""
    require_flwr()

    def body():
        from ..budget import plan_run
        from ..data import summarize_data
        from ..profiles import load_profile
        from ..train import TrainConfig
        from .runner import flower_command, supernode_argv

        if insecure == (root_certificates is not None):
            raise ConfigError("give exactly one of --insecure and --root-certificates")
        config = TrainConfig(hidden=parse_hidden(hidden), method=method, epsilon=epsilon, batch_size=batch_size,
                             similarity_samples=similarity_samples, test_fraction=0.0).validate()
        prof = load_profile(profile) if profile else None
        plan_run(config, summarize_data(data), prof)  # BudgetError (exit 3) before joining
        node_config = {"data": str(Path(data).resolve()),
                       "state-dir": str((state_dir or Path(data + ".fleet")).resolve())}
        if profile:
            node_config["profile"] = str(Path(profile).resolve()) if profile.endswith(".toml") else profile
        argv = supernode_argv(superlink, port, node_config,
                              root_certificates=str(root_certificates.resolve()) if root_certificates else None,
                              private_key=str(auth_private_key.resolve()) if auth_private_key else None)
        os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        sys.stderr.flush()
        os.execv(flower_command("flower-supernode"), argv)

    run_command(body)


@fleet_app.command()
def simulate(
    clients: Annotated[int, typer.Option(help="SuperNodes to start on 127.0.0.1, one process each.")] = 10,
    data: Annotated[str, typer.Option(help="Data to partition among the clients (any `train --data` format).")] = "builtin:digits",
    partition: Annotated[str, typer.Option(help="iid, or dirichlet:ALPHA (label skew; smaller ALPHA, more skew).")] = "iid",
    rounds: Rounds = 20,
    local_epochs: LocalEpochs = 1,
    min_replies: MinReplies = None,
    round_timeout: RoundTimeout = 600.0,
    rule: Rule = "regrow",
    method: Method = _D.method,
    hidden: Hidden = ",".join(map(str, _D.hidden)),
    epsilon: Epsilon = _D.epsilon,
    zeta: Zeta = _D.zeta,
    batch_size: LocalBatchSize = None,
    lr: Lr = _D.lr,
    seed: Seed = _D.seed,
    similarity_samples: SimilaritySamples = _D.similarity_samples,
    server_lr: ServerLr = 1.0,
    server_momentum: ServerMomentumOpt = SERVER_MOMENTUM,
    value_dtype: ValueDtype = "float32",
    test_fraction: Annotated[float, typer.Option(help="Held-out test part when the data has no X_test.")] = 0.2,
    profile: Annotated[Optional[str], typer.Option(help="Device profile every simulated client runs under.")] = None,
    dir: Annotated[Optional[Path], typer.Option("--dir", help="Keep the run directory here (default: a temporary one, removed at the end).")] = None,
    force: Annotated[bool, typer.Option(help="Start over in a --dir that holds a run; overwrite --out.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the final global model here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document with every round on stdout.")] = False,
):
    """Fleet training on this machine: a real SuperLink and N real SuperNodes on loopback."""
    require_flwr()

    def body():
        if out is not None and out.exists() and not force:
            run.check_output(out, force=False)
        if clients < 1:
            raise ConfigError(f"'clients' must be an int >= 1; got {clients}")
        train = _train_settings(method, hidden, epsilon, zeta, local_batch_size(batch_size, clients), lr, seed,
                                similarity_samples)
        run_dir = dir if dir is not None else Path(tempfile.mkdtemp(prefix="ctre-fleet-"))
        try:
            doc = _simulate(run_dir, train, clients=clients, data=data, partition=partition, rounds=rounds,
                            local_epochs=local_epochs, min_replies=min_replies or max(1, clients // 2),
                            round_timeout=round_timeout, rule=rule, value_dtype=value_dtype,
                            test_fraction=test_fraction, profile=profile, force=force, quiet=as_json,
                            server_lr=server_lr, server_momentum=server_momentum)
        finally:
            if dir is None:
                shutil.rmtree(run_dir, ignore_errors=True)
        if out is not None:
            doc.pop("model").save(out, force=force)
        else:
            doc.pop("model")
        if as_json:
            print_json(doc)

    run_command(body)


def _simulate(run_dir: Path, train: dict, *, clients: int, data: str, partition: str, rounds: int, local_epochs: int,
              min_replies: int, round_timeout: float, rule: str, value_dtype: str, test_fraction: float,
              profile: str | None, force: bool, quiet: bool, server_lr: float = 1.0,
              server_momentum: float = 0.0) -> dict:
    import numpy as np

    from ..data import load_data
    from .partition import parse_partition, split_clients
    from .runner import (
        CountingRelay,
        Server,
        flower_env,
        free_port,
        free_ports,
        make_settings,
        start,
        stop,
        supernode_argv,
    )
    from .wire import dense_bytes, payload_floor

    say = (lambda text: None) if quiet else err.print
    kind, alpha = parse_partition(partition)
    dataset = load_data(data)
    _prepare_run_dir(run_dir, False, force)
    files, X_test, y_test = split_clients(dataset, clients, kind, alpha, test_fraction, train["seed"], run_dir)
    settings = make_settings(run_dir, train=train, rounds=rounds, local_epochs=local_epochs, rule=rule,
                             min_clients=clients, min_replies=min_replies, round_timeout=round_timeout,
                             join_timeout=300.0, value_dtype=value_dtype, resume=False, server_lr=server_lr,
                             server_momentum=server_momentum)
    srv = Server(run_dir, port=free_port())
    _stop_on_sigterm()
    nodes, relays = [], []
    rows = []
    try:
        srv.start()
        # Every relay holds its port before the nodes' ports are chosen, all at once: a port chosen
        # and released before a relay bound port 0 could be the relay's, and that node then failed
        # to start (seen in a test run, which then waited for the join timeout).
        for _ in files:
            relays.append(CountingRelay(srv.port))  # appended one by one: the cleanup below closes each
        for i, (f, relay, port) in enumerate(zip(files, relays, free_ports(len(files)))):
            node_config = {"data": f, "state-dir": run_dir / f"node{i}"}
            if profile:
                node_config["profile"] = profile
            argv = supernode_argv(f"127.0.0.1:{relay.port}", port, node_config)
            nodes.append(start(argv, run_dir / f"node{i}.log", flower_env(run_dir / f"node{i}" / "flwr-home")))
        run_id = srv.submit()
        say(f"fleet run {run_id}: {clients} SuperNodes and a SuperLink on 127.0.0.1, {partition} partition, "
            f"{rounds} rounds x {local_epochs} local epoch(s)")
        t_start = time.perf_counter()

        def on_round(h, m):
            acc = float(np.mean(np.argmax(m.predict_proba(X_test), axis=1) == y_test)) if h["round"] == m.metrics["round"] \
                else float("nan")
            rows.append(dict(h, test_accuracy=acc, elapsed=time.perf_counter() - t_start))
            say(f"round {h['round']}/{rounds}: test accuracy {acc:.4f}, {h['replies']}/{h['sent']} replies, "
                f"{h['seconds']:.1f} s")

        model = _follow(srv, settings, on_round)
        time.sleep(0.5)
        # Bytes of round r: from its start to the next round's start (the last: to its end), at every socket.
        for i, row in enumerate(rows):
            end = rows[i + 1]["started"] if i + 1 < len(rows) else row["finished"] + 0.3
            a = [r.counts_at(row["started"]) for r in relays]
            b = [r.counts_at(end) for r in relays]
            row["socket_up"] = sum(y[0] - x[0] for x, y in zip(a, b)) / clients
            row["socket_down"] = sum(y[1] - x[1] for x, y in zip(a, b)) / clients
        total = [r.counts() for r in relays]
        run_up, run_down = (sum(t[k] for t in total) / clients for k in (0, 1))
        flower = srv.status()
    finally:
        for p in nodes:
            stop(p)
        srv.stop()
        for r in relays:
            r.close()
    nnz_layers = model.layers
    floor = payload_floor(nnz_layers)
    dense = dense_bytes(model.sizes)
    traffic = flower.get("network-traffic", {})
    doc = {"clients": clients, "partition": partition, "rounds": rounds, "local_epochs": local_epochs, "rule": rule,
           "method": train["method"], "batch_size": train["batch_size"], "server_lr": server_lr,
           "server_momentum": server_momentum, "sizes": model.sizes, "nnz": model.nnz, "value_dtype": value_dtype,
           "test_accuracy": rows[-1]["test_accuracy"] if rows else None, "payload_floor_bytes": floor,
           "dense_fedavg_bytes": dense, "flower_traffic": traffic, "history": rows, "model": model,
           "socket_total_per_client": {"up": run_up, "down": run_down}}
    if not quiet:
        _table(doc)
    return doc


def _table(doc: dict) -> None:
    from rich.table import Table

    t = Table(caption="KB per client at the socket; payload KB: the model message down", title=f"fleet simulate: {doc['clients']} clients, {doc['partition']}, {doc['method']}, rule {doc['rule']}")
    for c in ("round", "test acc", "replies", "down KB", "up KB", "payload KB", "down/floor", "up/floor", "seconds"):
        t.add_column(c, justify="right")
    floor, dense = doc["payload_floor_bytes"], doc["dense_fedavg_bytes"]
    for h in doc["history"]:
        t.add_row(str(h["round"]), f"{h['test_accuracy']:.4f}", f"{h['replies']}/{h['sent']}",
                  f"{h['socket_down'] / 1e3:.1f}", f"{h['socket_up'] / 1e3:.1f}",
                  f"{h['payload_down'] / h['sent'] / 1e3:.1f}", f"{h['socket_down'] / floor:.2f}",
                  f"{h['socket_up'] / floor:.2f}", f"{h['seconds']:.1f}")
    err.print(t)
    tr = doc["flower_traffic"]
    n = len(doc["history"])
    mean_down = sum(h["socket_down"] for h in doc["history"]) / max(1, n)
    mean_up = sum(h["socket_up"] for h in doc["history"]) / max(1, n)
    tot = doc["socket_total_per_client"]
    err.print(f"mean per client per round at the socket: {mean_down / 1e3:.1f} KB down ({mean_down / floor:.2f}x "
                  f"the floor, {dense / mean_down:.0f}x less than dense), {mean_up / 1e3:.1f} KB up ({mean_up / floor:.2f}x, "
                  f"{dense / mean_up:.0f}x less); whole run per client, setup included: {tot['down'] / 1e3:.1f} KB down, "
                  f"{tot['up'] / 1e3:.1f} KB up")
    err.print(f"payload floor {floor / 1e3:.1f} KB (connections x (2 + 4) + biases x 4); dense FedAvg "
                  f"{dense / 1e6:.2f} MB per client per direction; Flower's own count for the run: "
                  f"{tr.get('inbound-bytes', 0) / 1e3:.1f} KB in, {tr.get('outbound-bytes', 0) / 1e3:.1f} KB out")
