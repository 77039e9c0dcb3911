"""The Flower ServerApp and ClientApp of fleet training (Message API; imports flwr).

Each round the server sends the global sparse model (one byte array, ``wire.py``) to every
connected node; each node trains ``local_epochs`` epochs on its own data with ``train`` (the
same engine as ``ctre-edge train``) starting from it, and replies with its sparse model, its
growth votes and its sample count; the ``SparseFleet`` strategy aggregates (``aggregate.py``).
A round ends when every node replied or ``round_timeout`` passed; it counts if at least
``min_replies`` valid replies came, else it is repeated: a node may be offline for a while. But
where every node replied and none validly ``HARD_FAILURES`` times in a row (each node's training or
data fails, say), repeating will not mend it: the run stops with the nodes' reasons. After each
round the global model and the history are checkpointed in the run directory, from which
``resume`` continues.

Nodes learn the run from their ``node_config``: ``data`` (a file any ``--data`` loader reads),
``profile`` (optional) and ``state-dir`` (where the input scaling is kept between rounds, since
every round runs in a fresh ClientApp process).
"""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from . import wire
from .aggregate import aggregate
from .state import RunState, load_settings

STYPE = "ctre-edge.fleet"


def pack(blob: bytes) -> ArrayRecord:
    """One Flower Array of raw bytes: one content-addressed object per model, not one per tensor."""
    return ArrayRecord({"m": Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def unpack(record: ArrayRecord) -> bytes:
    if list(record.keys()) != ["m"] or record["m"].stype != STYPE:
        raise wire.WireError("fleet message does not hold one ctre-edge model array")
    return bytes(record["m"].data)


class SparseFleet(Strategy):
    """Sparse-model strategy: send the wire model, aggregate connection by connection."""

    def __init__(self, run: RunState):
        self.run = run
        self.has_scaling: set[int] = set()  # nodes known to hold this run's input scaling
        self.failures: list[str] = []  # why the last round's invalid replies were left out

    def configure_train(self, server_round, arrays, config, grid):
        model = self.run.model
        note = {"settings": self.run.client_settings()}  # in the model array: no extra Flower object
        plain = wire.encode(wire.WireModel(model.layers, server_round, note=note), self.run.settings["value_dtype"])
        scaled = None
        messages = []
        for node in grid.get_node_ids():
            if node in self.has_scaling:
                blob = plain
            else:
                scaled = scaled or wire.encode(wire.WireModel(model.layers, server_round, model.shift, model.scale,
                                                              note=note), self.run.settings["value_dtype"])
                blob = scaled
            content = RecordDict({"model": pack(blob)})
            messages.append(Message(content, dst_node_id=node, message_type="train"))
        return messages

    def aggregate_train(self, server_round, replies):
        """(new global layers or None, metrics); invalid replies are logged and left out, and their
        reasons kept in ``failures`` (one line per node) for ``_train_rounds``."""
        models, weights, votes, metrics = [], [], [], []
        self.failures = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "round %s: node %s failed: %s", server_round, node, reply.error.reason)
                self.failures.append(f"node {node} failed: {reply.error.reason}")
                continue
            try:
                refused = _refused(reply)
                if refused:
                    if refused == "needs-scaling":
                        self.has_scaling.discard(node)  # a step of the protocol: sent again with the scaling
                    else:
                        self.failures.append(f"node {node} refused: {refused}")
                    log(WARNING, "round %s: node %s refused: %s", server_round, node, refused)
                    continue
                blob = unpack(reply.content.array_records["model"])
                m = wire.decode(blob, self.run.model.sizes)
                if m.round != server_round:
                    raise wire.WireError(f"reply is for round {m.round}, not {server_round}")
                if m.note is None:
                    raise wire.WireError("reply carries no note with its sample count")
                met = {k: float(m.note[k]) for k in ("samples", "val_before", "val_after", "seconds")}
                samples = met["samples"]
                if not (np.isfinite(samples) and samples >= 1):
                    raise wire.WireError(f"reply has an invalid sample count {samples!r}")
            except Exception as e:  # noqa: BLE001 - no reply, however malformed, stops the server
                why = e if isinstance(e, wire.WireError) else f"{type(e).__name__}: {e}"
                log(WARNING, "round %s: rejected the reply of node %s: %s", server_round, node, why)
                self.failures.append(f"rejected the reply of node {node}: {why}")
                continue
            self.has_scaling.add(node)
            models.append(m.layers)
            weights.append(samples)
            votes.append(m.votes)
            metrics.append(met | {"node": node, "bytes_up": len(blob)})
        if len(models) < self.run.settings["min_replies"]:
            return None, metrics
        s = self.run.settings
        rng = np.random.default_rng([s["train"]["seed"], server_round])
        layers = aggregate(models, weights, self.run.targets, rule=s["rule"], zeta=s["train"]["zeta"],
                           votes=votes, rng=rng, start=self.run.model.layers, server=self.run.server)
        return layers, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []  # clients report the global model's accuracy on their validation rows in train

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        s = self.run.settings
        log(INFO, "SparseFleet: rule %s, server lr %s, server momentum %s, %s rounds, %s local epochs, "
            "min replies %s, round timeout %ss", s["rule"], self.run.server.lr, self.run.server.momentum, s["rounds"],
            s["local_epochs"], s["min_replies"], s["round_timeout"])


server = ServerApp()
client = ClientApp()


@server.main()
def _server_main(grid: Grid, context: Context) -> None:
    settings = load_settings(Path(str(context.run_config["settings-file"])))
    run = RunState(settings)
    strategy = SparseFleet(run)
    strategy.summary()
    if run.round == 0:
        run.setup(_collect_summaries(grid, settings))
    _train_rounds(grid, run, strategy, settings)
    run.finish()


# Attempts in a row in which every node replied and none validly, after which a round or the setup
# is not asked again: the run stops, naming the nodes' reasons (their training or data fails alike
# each time). Attempts with a node missing do not count: it may come back.
HARD_FAILURES = 3


def _hard_failures(count: int, sent: int, missing: int, valid: int, failures: list[str], what: str) -> int:
    """The count of such attempts after this one; raises RuntimeError when it reaches HARD_FAILURES."""
    count = count + 1 if sent and not missing and not valid and failures else 0
    if count >= HARD_FAILURES:
        raise RuntimeError(f"{what}: every node replied and none validly, {count} times in a row, so the run "
                           f"stops: " + "; ".join(failures[:4]) + ("; ..." if len(failures) > 4 else ""))
    return count


def _train_rounds(grid: Grid, run: RunState, strategy: SparseFleet, settings: dict) -> None:
    hard = 0
    while run.round < settings["rounds"]:
        r = run.round + 1
        t0, started = time.perf_counter(), time.time()
        messages = list(strategy.configure_train(r, None, ConfigRecord(), grid))
        replies, missing = _send_and_wait(grid, messages, settings)
        layers, metrics = strategy.aggregate_train(r, replies)
        seconds = time.perf_counter() - t0
        if layers is None:
            log(WARNING, "round %s: %s valid replies of %s (need %s); repeating the round", r, len(metrics),
                len(messages), settings["min_replies"])
            run.note_failed_round(r, len(metrics), len(messages))
            hard = _hard_failures(hard, len(messages), missing, len(metrics), strategy.failures, f"round {r}")
            time.sleep(1.0)
            continue
        hard = 0
        down = sum(len(m.content.array_records["model"]["m"].data) for m in messages)
        run.finish_round(layers, metrics, seconds, sent=len(messages), missing=missing, payload_down=down,
                         started=started)
        log(INFO, "round %s: %s replies, %s missing, %.1f s", r, len(metrics), missing, seconds)


def _collect_summaries(grid: Grid, settings: dict) -> list[dict]:
    """Wait for ``min_clients`` nodes, then ask each for its data's shape, classes and feature range."""
    deadline = time.monotonic() + settings["join_timeout"]
    while len(list(grid.get_node_ids())) < settings["min_clients"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {settings['min_clients']} clients joined within "
                               f"{settings['join_timeout']} s")
        time.sleep(0.5)
    hard = 0
    while True:
        messages = [Message(RecordDict({"config": ConfigRecord({"scaling": settings["train"]["scaling"]})}),
                            dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
        replies, missing = _send_and_wait(grid, messages, settings)
        out, failures = [], []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "setup: node %s failed: %s", reply.metadata.src_node_id, reply.error.reason)
                failures.append(f"node {reply.metadata.src_node_id} failed: {reply.error.reason}")
                continue
            refused = _refused(reply)
            if refused:
                log(WARNING, "setup: node %s refused: %s", reply.metadata.src_node_id, refused)
                failures.append(f"node {reply.metadata.src_node_id} refused: {refused}")
                continue
            try:
                doc = json.loads(str(reply.content.config_records["summary"]["json"]))
                for name, (a, b) in (("range", ("lo", "hi")), ("moments", ("s1", "s2"))):
                    stats = wire.decode(unpack(reply.content.array_records[name]))
                    doc[a], doc[b] = stats.shift, stats.scale
                out.append(doc)
            except (wire.WireError, KeyError, TypeError, ValueError) as e:
                log(WARNING, "setup: rejected the reply of node %s: %s", reply.metadata.src_node_id, e)
                failures.append(f"rejected the reply of node {reply.metadata.src_node_id}: {e}")
        if len(out) >= settings["min_replies"]:
            return out
        log(WARNING, "setup: %s valid replies, need %s; asking again", len(out), settings["min_replies"])
        hard = _hard_failures(hard, len(messages), missing, len(out), failures, "setup")
        time.sleep(1.0)


def _send_and_wait(grid: Grid, messages: list, settings: dict) -> tuple[list, int]:
    """Push, then pull until every reply came, the nodes still waited for left, or the timeout passed."""
    ids = {mid: m.metadata.dst_node_id for mid, m in zip(grid.push_messages(messages), messages) if mid}
    replies = []
    deadline = time.monotonic() + settings["round_timeout"]
    while ids and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(ids)):
            ids.pop(reply.metadata.reply_to_message_id, None)
            replies.append(reply)
        if ids:
            online = set(grid.get_node_ids())
            if len(replies) >= settings["min_replies"] and not online & set(ids.values()):
                break  # everyone still missing has left the fleet: no reason to wait for the timeout
            time.sleep(0.2)
    return replies, len(ids)


# -- client side ----------------------------------------------------------------------------------
@client.query()
def _client_query(msg: Message, context: Context) -> Message:
    """The node's data summary and feature statistics, for the run's shared input scaling."""
    from ..data import load_data, resolve_scaling
    from ..layers import SparseLayer

    try:
        data = load_data(str(context.node_config["data"]))
        X = data.X
        method = resolve_scaling(X, str(msg.content.config_records["config"]["scaling"]))
        X64 = X.astype(np.float64)
        # The statistics travel in the wire format's scaling slot, over a stub layer with no connections.
        stub = SparseLayer(X.shape[1], 1, np.zeros(X.shape[1] + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(0, np.float32), np.zeros(1, np.float32))
        pair = lambda a, b: pack(wire.encode(wire.WireModel([stub], 0, a.astype(np.float32), b.astype(np.float32))))  # noqa: E731
        doc = {"n": int(X.shape[0]), "n_features": int(X.shape[1]), "scaling": method,
               "classes": [_plain(c) for c in data.classes]}
        return Message(RecordDict({"range": pair(X64.min(axis=0), X64.max(axis=0)),
                                   "moments": pair(X64.sum(axis=0), (X64 * X64).sum(axis=0)),
                                   "summary": ConfigRecord({"json": json.dumps(doc)})}), reply_to=msg)
    except Exception as e:  # noqa: BLE001 - a node reports its failure instead of dying silently
        return _refusal(msg, f"{type(e).__name__}: {e}")


@client.train()
def _client_train(msg: Message, context: Context) -> Message:
    try:
        return _train_round(msg, context)
    except Exception as e:  # noqa: BLE001 - a node reports its failure instead of dying silently
        return _refusal(msg, f"{type(e).__name__}: {e}")


def _refused(reply: Message) -> str | None:
    """The error of a node's refusal (``_refusal``), or None for any other reply."""
    status = reply.content.config_records.get("status")
    return status.get("error") if status is not None else None


def _refusal(msg: Message, text: str) -> Message:
    log(WARNING, "fleet client: %s", text)
    return Message(RecordDict({"status": ConfigRecord({"error": text})}), reply_to=msg)


def _train_round(msg: Message, context: Context) -> Message:
    from ..budget import plan_run
    from ..data import Dataset, load_data, summarize_loaded
    from ..model import SparseMLP
    from ..train import TrainConfig, split_data, train

    t0 = time.perf_counter()
    g = wire.decode(unpack(msg.content.array_records["model"]))
    r, s = g.round, (g.note or {}).get("settings")
    if not isinstance(s, dict):
        return _refusal(msg, "the server's model message carries no settings")
    state_dir = Path(str(context.node_config.get("state-dir", ".")))
    scaling_file = state_dir / f"scaling-{s['run_id']}.npz"
    if g.shift is not None:
        state_dir.mkdir(parents=True, exist_ok=True)
        from ..fileio import atomic_write

        atomic_write(scaling_file, lambda f: np.savez(f, shift=g.shift, scale=g.scale), force=True)
        shift, scale = g.shift, g.scale
    elif scaling_file.is_file():
        with np.load(scaling_file) as z:
            shift, scale = z["shift"], z["scale"]
    else:
        return _refusal(msg, "needs-scaling")

    data = load_data(str(context.node_config["data"]))
    classes = s["classes"]
    lookup = {str(c): i for i, c in enumerate(classes)}
    try:
        codes = np.array([lookup[str(data.classes[c])] for c in range(len(data.classes))], np.int64)
    except KeyError as e:
        return _refusal(msg, f"label {e} of this node's data is not among the run's classes {classes}")
    data = Dataset(data.X, codes[data.y], classes, name=data.name)
    # early_stop 0: a round's few local epochs all run; the server decides when the run ends.
    config = TrainConfig.from_dict(dict(s["train"], epochs=s["local_epochs"], test_fraction=0.0, early_stop=0,
                                        seed=(s["train"]["seed"] * 1_000_003 + r * 7919 + context.node_id) % 2**63))
    config.validate()
    profile = str(context.node_config.get("profile", "") or "")
    if profile:
        import numba

        from ..profiles import load_profile

        prof = load_profile(profile)
        config, _ = plan_run(config, summarize_loaded(data), prof, data_bytes=data.nbytes)  # a new config: the cap applied
        numba.set_num_threads(max(1, min(prof.threads, numba.config.NUMBA_NUM_THREADS)))
    start = SparseMLP(g.layers, shift, scale, classes)
    _, val_rows, _, _ = split_data(data, config, np.random.default_rng(np.random.SeedSequence(config.seed).spawn(4)[0]))
    val_before = float(np.mean(np.argmax(start.predict_proba(data.X[val_rows]), axis=1) == data.y[val_rows]))
    result = train(data, config, start_from=start)
    local = result.model
    votes = _votes(local, data, config, s) if s["rule"] == "regrow" and config.method.startswith("ctre") else []
    note = {"samples": int(local.metrics["train_samples"]), "val_before": val_before,
            "val_after": float(local.metrics["best_val_accuracy"]), "seconds": time.perf_counter() - t0}
    blob = wire.encode(wire.WireModel(local.layers, r, votes=votes, note=note), s["value_dtype"])
    return Message(RecordDict({"model": pack(blob)}), reply_to=msg)


def _votes(model, data, config, s) -> list:
    """This node's growth proposal per layer: the top floor(zeta*nnz) missing connections by |cosine|."""
    from ..evolve import sample_activations
    from ..packed import PackedNet
    from ..similarity import topk_cosine_live

    net = PackedNet.from_layers(model.layers)
    rng = np.random.default_rng(config.seed + 1)
    levels = sample_activations(net, data.X, np.arange(data.X.shape[0]), model.shift, model.scale,
                                config.similarity_samples, rng)
    out = []
    for l, layer in enumerate(model.layers):
        k = min(int(np.floor(config.zeta * layer.nnz)), layer.n_in * layer.n_out - layer.nnz)
        rows, cols = topk_cosine_live(levels[l], levels[l + 1], layer.indptr, layer.indices, k,
                                      workspace_bytes=config.similarity_workspace_mib << 20)[:2]
        out.append(rows.astype(np.int64) * layer.n_out + cols.astype(np.int64))
    return out


def _plain(c):
    return c.item() if isinstance(c, np.generic) else c


os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
