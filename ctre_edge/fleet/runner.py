"""Processes of a fleet run: the SuperLink, the run submitted to it, SuperNodes, and a byte-counting relay.

A run directory holds everything of one run: ``settings.json``, the Flower App bundle source
(``app/``, a pyproject and a two-line module pointing at ``ctre_edge.fleet.apps``), a private
``FLWR_HOME`` per process, logs, and the checkpoint ``global.ctre``. Every process is started in
its own session so that it and its children (ServerApp, ClientApp) can be stopped by its id.
No flwr import here: the Flower programs are run as the commands they install.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..errors import ConfigError, CtreError

APP_MODULE = "ctre_edge_fleet_app"


class FleetError(CtreError, RuntimeError):
    """A Flower process failed to start or the run ended in failure."""

    exit_code = 1


def flower_command(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(home: Path) -> dict:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0")
    home.mkdir(parents=True, exist_ok=True)
    return env


def write_app(run_dir: Path) -> Path:
    """The Flower App directory ``flwr run`` bundles; its components live in the installed ctre_edge."""
    app = run_dir / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "ctre-edge-fleet"
version = "1.0.0"
description = "Fleet training of sparse MLPs with ctre-edge"
license = "MIT"
dependencies = []

[tool.flwr.app]
publisher = "ctre-edge"

[tool.flwr.app.components]
serverapp = "{APP_MODULE}:server"
clientapp = "{APP_MODULE}:client"

[tool.flwr.app.config]
settings-file = {json.dumps(str((run_dir / "settings.json").resolve()))}
""")
    (app / f"{APP_MODULE}.py").write_text("from ctre_edge.fleet import apps\n\nserver = apps.server\nclient = apps.client\n")
    return app


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now, for processes that bind them later. Bound all at once,
    so none is handed out twice; one at a time, a port closed again could be the next one's too."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start(argv: list[str], log: Path, env: dict) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)


def stop(proc: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started and everything it started: its process group, and descendants
    that made sessions of their own (the SuperLink's SuperExec does)."""
    family = descendants(proc.pid)
    if proc.poll() is None:
        _kill_group(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid, signal.SIGKILL)
    for pid in family:
        _kill_group(pid, signal.SIGKILL)
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (by parent links in /proc; empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def superlink_argv(run_dir: Path, host: str, port: int, tls: dict | None, auth: bool) -> list[str]:
    argv = [flower_command("flower-superlink"), "--host", host, "--port", str(port),
            "--database", str(run_dir / "superlink.db"), "--disable-runtime-dependency-installation"]
    if tls:
        argv += ["--ssl-certfile", tls["certfile"], "--ssl-keyfile", tls["keyfile"]]
        if tls.get("ca_certfile"):
            argv += ["--ssl-ca-certfile", tls["ca_certfile"]]
    else:
        argv.append("--insecure")
    if auth:
        argv.append("--enable-supernode-auth")
    return argv


def supernode_argv(superlink: str, port: int, node_config: dict, *, root_certificates: str | None = None,
                   private_key: str | None = None) -> list[str]:
    config = " ".join(f"{k}={json.dumps(str(v))}" for k, v in node_config.items())
    argv = [flower_command("flower-supernode"), "--superlink", superlink, "--port", str(port),
            "--node-config", config]
    argv += ["--root-certificates", root_certificates] if root_certificates else ["--insecure"]
    if private_key:
        argv += ["--auth-supernode-private-key", private_key]
    return argv


class Server:
    """A SuperLink plus the fleet run submitted to it, in ``run_dir``."""

    def __init__(self, run_dir: Path, host: str = "127.0.0.1", port: int = 9092, tls: dict | None = None,
                 auth: bool = False):
        self.run_dir, self.host, self.port, self.tls, self.auth = Path(run_dir), host, port, tls, auth
        self.home = self.run_dir / "flwr-home"
        self.env = flower_env(self.home)
        self.proc: subprocess.Popen | None = None
        self.run_id: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        write_app(self.run_dir)
        connect = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        conn = {"address": f"{connect}:{self.port}"}
        if self.tls:
            conn["root-certificates"] = self.tls.get("ca_certfile") or self.tls["certfile"]
        else:
            conn["insecure"] = True
        lines = ["[superlink]", 'default = "ctre"', "[superlink.ctre]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in conn.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")
        self.proc = start(superlink_argv(self.run_dir, self.host, self.port, self.tls, self.auth),
                          self.run_dir / "superlink.log", self.env)
        (self.run_dir / "superlink.pid").write_text(str(self.proc.pid))
        wait_port(connect, self.port, timeout, self.proc, "flower-superlink")

    def _flwr(self, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """Flower's ``flwr`` command against this SuperLink (its FLWR_HOME names the connection)."""
        return subprocess.run([flower_command("flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def submit(self) -> int:
        out = self._flwr("run", str(self.run_dir / "app"), "ctre", "--format", "json", timeout=120)
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
            self.run_id = int(doc["run-id"])
        except (ValueError, KeyError) as e:
            raise FleetError(f"flwr run failed ({e}): {(out.stdout + out.stderr).strip()[-400:]}") from None
        return self.run_id

    def status(self) -> dict:
        """Flower's record of the run (status and its own traffic count), from ``flwr ls``."""
        out = self._flwr("ls", "ctre", "--run-id", str(self.run_id), "--format", "json", timeout=60)
        try:
            doc = json.loads(out.stdout[out.stdout.index("{"):])
            return doc["runs"][0]
        except (ValueError, KeyError, IndexError):
            return {}

    def server_log(self) -> str:
        """The ServerApp's own log (Flower keeps it in the SuperLink, not in superlink.log), from ``flwr log``."""
        try:
            out = self._flwr("log", str(self.run_id), "ctre", "--show", timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes each way: traffic measured at the socket.

    A SuperNode pointed at the relay reaches the SuperLink through it; ``up`` counts bytes the
    node sent, ``down`` bytes it received, headers, retries and heartbeats included.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.up = 0
        self.down = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.samples: list[tuple[float, int, int]] = []  # (wall time, up, down), every 0.1 s
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down

    def counts_at(self, when: float) -> tuple[int, int]:
        """(up, down) as they were at wall time ``when`` (the last sample before it)."""
        import bisect

        i = bisect.bisect_right(self.samples, (when, float("inf"), float("inf"))) - 1
        return self.samples[i][1:] if i >= 0 else (0, 0)

    def _sample(self) -> None:
        while not self.closed:
            self.samples.append((time.time(), *self.counts()))
            time.sleep(0.1)

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                conn.close()
                continue
            threading.Thread(target=self._pipe, args=(conn, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, conn, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def make_settings(run_dir: Path, *, train: dict, rounds: int, local_epochs: int, rule: str, min_clients: int,
                  min_replies: int, round_timeout: float, join_timeout: float, value_dtype: str,
                  resume: bool, server_lr: float = 1.0, server_momentum: float = 0.0) -> dict:
    """Validated settings of a run, written to ``run_dir/settings.json`` (kept on --resume)."""
    from .aggregate import RULES

    for name, value, lo in (("rounds", rounds, 1), ("local_epochs", local_epochs, 1), ("min_clients", min_clients, 1),
                            ("min_replies", min_replies, 1)):
        if not isinstance(value, int) or value < lo:
            raise ConfigError(f"'{name}' must be an int >= {lo}; got {value!r}")
    if min_replies > min_clients:
        raise ConfigError(f"'min_replies' ({min_replies}) cannot exceed 'min_clients' ({min_clients})")
    if not round_timeout > 0 or not join_timeout > 0:
        raise ConfigError("'round_timeout' and 'join_timeout' must be > 0 seconds")
    if rule not in RULES:
        raise ConfigError(f"'rule' must be one of {', '.join(RULES)}; got {rule!r}")
    if not (isinstance(server_lr, (int, float)) and 0 < server_lr <= 10):
        raise ConfigError(f"'server_lr' must be a number in (0, 10]; got {server_lr!r}")
    if not (isinstance(server_momentum, (int, float)) and 0 <= server_momentum < 1):
        raise ConfigError(f"'server_momentum' must be a number in [0, 1); got {server_momentum!r}")
    if value_dtype not in ("float32", "float16"):
        raise ConfigError(f"'value_dtype' must be float32 or float16; got {value_dtype!r}")
    path = run_dir / "settings.json"
    run_id = os.urandom(8).hex()
    if resume and path.is_file():
        run_id = json.loads(path.read_text()).get("run_id", run_id)
    settings = {"run_dir": str(run_dir.resolve()), "run_id": run_id, "train": train, "rounds": rounds,
                "local_epochs": local_epochs, "rule": rule, "min_clients": min_clients, "min_replies": min_replies,
                "round_timeout": float(round_timeout), "join_timeout": float(join_timeout),
                "value_dtype": value_dtype, "resume": resume, "server_lr": float(server_lr),
                "server_momentum": float(server_momentum)}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1))
    return settings
