"""``radfl coordinator``: the federation folder, the SuperLink and MLflow server, and runs.

A federation folder holds everything the coordinator needs and nothing a site keeps secret::

    DIR/federation.toml      name, host names, ports, bind address
    DIR/ca.crt, ca.key       the federation's certificate authority (ca.key never leaves DIR)
    DIR/superlink.crt, .key  the SuperLink's TLS certificate (SANs: every --host) and key
    DIR/sites/NAME.pub       each registered site's public key (`radfl coordinator add-site`)
    DIR/flwr-home/           the Flower CLI's connection config (FLWR_HOME), rewritten each time
    DIR/state/               SuperLink state database, MLflow database and artifacts, logs

``start`` runs the SuperLink (TLS, SuperNode authentication, persistent state) and an MLflow
server (SQLite backend store, artifact store served through it) in the foreground until it is
stopped, registering every site's public key. ``run`` wraps ``flwr run`` and exits with the
run's real final status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common import pki
from common.config import ServerConfig, default_run_config, from_run_config
from common.errors import RadFLError

SETTINGS = "federation.toml"
DEFAULT_PORT = 8000
DEFAULT_MLFLOW_PORT = 5000
STARTUP_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Federation:
    """A federation folder and its settings."""

    root: Path
    name: str
    hosts: tuple[str, ...]
    port: int
    mlflow_port: int
    bind: str

    # ------------------------------------------------------------------ paths
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink.key"

    @property
    def sites_dir(self) -> Path:
        return self.root / "sites"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def registered_file(self) -> Path:
        return self.state / "registered.json"

    @property
    def address(self) -> str:
        """Where sites and the Flower CLI dial the SuperLink."""
        return f"{self.hosts[0]}:{self.port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.hosts[0]}:{self.mlflow_port}"

    # --------------------------------------------------------------- settings
    @classmethod
    def load(cls, root: Path) -> Federation:
        path = Path(root) / SETTINGS
        try:
            data = tomllib.loads(path.read_text())
        except OSError as exc:
            raise RadFLError(
                f"{path}: {exc.strerror or exc}; make one with `radfl coordinator init`"
            ) from exc
        except tomllib.TOMLDecodeError as exc:
            raise RadFLError(f"{path}: {exc}") from exc
        try:
            return cls(
                root=Path(root).resolve(),
                name=str(data["name"]),
                hosts=tuple(str(h) for h in data["hosts"]),
                port=int(data["port"]),
                mlflow_port=int(data["mlflow-port"]),
                bind=str(data["bind"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RadFLError(f"{path}: missing or bad key {exc}") from exc

    def save(self) -> None:
        hosts = ", ".join(json.dumps(h) for h in self.hosts)
        (self.root / SETTINGS).write_text(
            "# RadFL federation settings (radfl coordinator init)\n"
            f"name = {json.dumps(self.name)}\n"
            f"hosts = [{hosts}]\n"
            f"port = {self.port}\n"
            f"mlflow-port = {self.mlflow_port}\n"
            f"bind = {json.dumps(self.bind)}\n"
        )

    def write_connection(self) -> None:
        """The Flower CLI's connection to this SuperLink, with absolute paths."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f"default = {json.dumps(self.name)}\n\n"
            f"[superlink.{self.name}]\n"
            f"address = {json.dumps(self.address)}\n"
            f"root-certificates = {json.dumps(str(self.ca_cert))}\n"
        )

    def env(self) -> dict[str, str]:
        """Environment of the Flower processes and CLI run for this federation."""
        env = dict(os.environ)
        env.update(
            FLWR_HOME=str(self.flwr_home),
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def registered(self) -> dict[str, Any]:
        if not self.registered_file.exists():
            return {}
        return dict(json.loads(self.registered_file.read_text()))


# ---------------------------------------------------------------------------- init
def init(
    root: Path,
    hosts: list[str],
    *,
    name: str = "radfl",
    port: int = DEFAULT_PORT,
    mlflow_port: int = DEFAULT_MLFLOW_PORT,
    bind: str = "0.0.0.0",
) -> Federation:
    """Create a federation folder: CA, SuperLink certificate, settings, connection config."""
    root = Path(root).resolve()
    if (root / SETTINGS).exists():
        raise RadFLError(f"{root} already holds a federation ({SETTINGS}); choose another folder")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", name):
        raise RadFLError(f"federation name {name!r} must be letters, digits, '-' and '_'")
    federation = Federation(root, name, tuple(hosts), port, mlflow_port, bind)
    root.mkdir(parents=True, exist_ok=True)
    federation.sites_dir.mkdir(exist_ok=True)
    federation.state.mkdir(exist_ok=True)
    ca_key, ca_cert = pki.make_ca(name)
    server_key, server_cert = pki.make_server_certificate(ca_key, ca_cert, hosts)
    pki.write_private(root / "ca.key", pki.key_pem(ca_key))
    federation.ca_cert.write_bytes(pki.pem(ca_cert))
    pki.write_private(federation.server_key, pki.key_pem(server_key))
    federation.server_cert.write_bytes(pki.pem(server_cert))
    federation.save()
    federation.write_connection()
    return federation


# ------------------------------------------------------------------------ add-site
def add_site(root: Path, name: str, public_key: Path) -> Path:
    """Register a site's public key in the federation folder, and with the SuperLink at once
    when it is running. Returns the stored key's path."""
    federation = Federation.load(root)
    pki.check_site_name(name)
    key = pki.read_site_public_key(public_key)
    stored = federation.sites_dir / f"{name}.pub"
    if stored.exists():
        raise RadFLError(f"site {name} is already registered ({stored})")
    for other in federation.sites_dir.glob("*.pub"):
        if other.read_bytes().strip() == key.strip():
            raise RadFLError(f"this public key is already registered as site {other.stem}")
    federation.sites_dir.mkdir(exist_ok=True)
    stored.write_bytes(key)
    if _superlink_running(federation):
        register_sites(federation)
    return stored


def register_sites(federation: Federation) -> dict[str, Any]:
    """Register with the running SuperLink every site key not registered in its state yet."""
    federation.write_connection()
    registered = federation.registered()
    for key in sorted(federation.sites_dir.glob("*.pub")):
        if key.stem in registered:
            continue
        done = subprocess.run(
            ["flwr", "supernode", "register", str(key), federation.name, "--name", key.stem]
            + ["--format", "json"],
            env=federation.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        reply = _json_tail(done.stdout)
        if done.returncode != 0 or not reply.get("success"):
            raise RadFLError(
                f"registering site {key.stem} failed: {(done.stdout + done.stderr).strip()[-400:]}"
            )
        registered[key.stem] = {"node-id": reply.get("node-id"), "key": key.name}
        federation.registered_file.write_text(json.dumps(registered, indent=2))
    return registered


def site_registry_config(federation: Federation) -> dict[str, str]:
    """The run-config entry that makes the ServerApp name each reply's site by the node Flower
    authenticated (issue 18): ``site-registry``, the absolute path of the registered file
    (``{name: {"node-id": ..., "key": ...}}``, written by :func:`register_sites`)."""
    return {"site-registry": str(federation.registered_file)}


# --------------------------------------------------------------------------- start
class Services:
    """The SuperLink and the MLflow server of a federation, as child process groups."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = federation.state / "logs"

    def start(self) -> None:
        federation = self.federation
        self.logs.mkdir(parents=True, exist_ok=True)
        federation.write_connection()
        state = federation.state
        self._spawn(
            "mlflow",
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", str(state / "mlartifacts"),
                "--host", federation.bind,
                "--port", str(federation.mlflow_port),
                "--workers", "1",
            ],
        )  # fmt: skip
        self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile", str(federation.ca_cert),
                "--ssl-certfile", str(federation.server_cert),
                "--ssl-keyfile", str(federation.server_key),
                "--enable-supernode-auth",
                "--database", str(state / "superlink.db"),
                "--host", federation.bind,
                "--port", str(federation.port),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        self._wait_until_healthy()
        register_sites(federation)
        (state / "services.json").write_text(
            json.dumps({name: p.pid for name, p in self.processes.items()})
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env=self.federation.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = {"superlink": _superlink_healthy, "mlflow": _mlflow_healthy}
        while waiting and time.monotonic() < deadline:
            self.check_alive()
            for name, healthy in list(waiting.items()):
                if healthy(self.federation):
                    del waiting[name]
            time.sleep(0.5)
        if waiting:
            self.stop()
            raise RadFLError(
                f"{', '.join(waiting)} did not answer within {STARTUP_TIMEOUT_S:.0f} s; see "
                f"{self.logs}"
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                self.stop()
                raise RadFLError(
                    f"{name} exited with code {process.returncode}; see {self.logs / name}.log"
                )

    def stop(self, timeout_s: float = 20.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # children of the group (ServerApps)
        with contextlib.suppress(FileNotFoundError):
            (self.federation.state / "services.json").unlink()


def start(root: Path) -> int:
    """Run the SuperLink and MLflow server until SIGINT or SIGTERM; 1 if one of them dies."""
    federation = Federation.load(root)
    services = Services(federation)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        services.start()
        print(
            f"[radfl] federation {federation.name}: SuperLink at {federation.address} (TLS, site "
            f"authentication), MLflow at {federation.mlflow_uri}; "
            f"{len(federation.registered())} sites registered; logs in {services.logs}",
            flush=True,
        )
        while not stopping:
            services.check_alive()
            time.sleep(0.5)
        return 0
    except RadFLError as exc:
        print(f"radfl: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------- run
def run(
    root: Path,
    app_dir: Path,
    overrides: Mapping[str, Any],
    *,
    timeout_s: float | None = None,
) -> int:
    """Submit a run with ``flwr run --stream``, then ask the SuperLink how it ended: 0 only
    for ``finished:completed`` (``flwr run --stream`` exits 0 even when the run failed)."""
    federation = Federation.load(root)
    federation.write_connection()
    values = {
        "run-key": uuid.uuid4().hex,
        "checkpoint-dir": str(federation.state / "checkpoints"),
        **site_registry_config(federation),
        **overrides,
    }
    from_run_config(ServerConfig, {**default_run_config(), **values})  # a typo fails here
    from simulations.simulate import format_run_config

    command = [
        "flwr", "run", str(Path(app_dir).resolve()), federation.name, "--stream",
        "--run-config", format_run_config(values),
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env=federation.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_id = None
    assert process.stdout is not None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for line in _lines(process.stdout):
        print(line, end="", flush=True)
        found = re.search(r"Successfully started run (\d+)", line)
        if found:
            run_id = int(found.group(1))
        if deadline is not None and time.monotonic() > deadline:
            process.kill()
            break
    process.wait()
    if run_id is None:
        print(f"radfl: error: flwr run did not start a run (exit {process.returncode})")
        return 1
    status = run_status(federation, run_id)
    print(f"[radfl] run {run_id} ({values['run-key']}): {status}; MLflow {federation.mlflow_uri}")
    return 0 if status == "finished:completed" else 1


def run_status(federation: Federation, run_id: int) -> str:
    """The SuperLink's status of a run (``finished:completed``, ``finished:failed``, ...)."""
    done = subprocess.run(
        ["flwr", "ls", federation.name, "--run-id", str(run_id), "--format", "json"],
        env=federation.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    reply = _json_tail(done.stdout)
    for entry in reply.get("runs", []):
        if str(entry.get("run-id")) == str(run_id):
            return str(entry.get("status", "unknown"))
    return f"unknown ({(done.stdout + done.stderr).strip()[-300:]})"


# ------------------------------------------------------------------------- helpers
def _lines(stream: Any) -> Iterator[str]:
    yield from iter(stream.readline, "")


def _json_tail(text: str) -> dict[str, Any]:
    """The JSON object a Flower CLI command printed last (it may print other lines first)."""
    start = text.find("{")
    while start != -1:
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(text[start:])
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
    return {}


def _superlink_healthy(federation: Federation) -> bool:
    try:
        url = f"https://{federation.address}/health"
        return httpx.get(url, timeout=2.0, verify=str(federation.ca_cert)).is_success
    except httpx.HTTPError:
        return False


def _mlflow_healthy(federation: Federation) -> bool:
    try:
        return httpx.get(f"{federation.mlflow_uri}/health", timeout=2.0).is_success
    except httpx.HTTPError:
        return False


def _superlink_running(federation: Federation) -> bool:
    return (federation.state / "services.json").exists() and _superlink_healthy(federation)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="coordinator_command", required=True)
    init_parser = commands.add_parser(
        "init", help="create a federation folder: CA, SuperLink certificate, settings"
    )
    init_parser.add_argument("dir", type=Path, help="the new federation folder")
    init_parser.add_argument(
        "--host",
        action="append",
        required=True,
        help="a host name or IP address sites dial (repeatable; each becomes a certificate SAN)",
    )
    init_parser.add_argument("--name", default="radfl", help="federation name (default radfl)")
    init_parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="SuperLink port")
    init_parser.add_argument(
        "--mlflow-port", type=int, default=DEFAULT_MLFLOW_PORT, help="MLflow server port"
    )
    init_parser.add_argument(
        "--bind", default="0.0.0.0", help="address the services listen on (default all)"
    )
    init_parser.set_defaults(handler=_init)

    add = commands.add_parser("add-site", help="register a site's public key")
    add.add_argument("name", help="the site's name (lower case, digits, dashes)")
    add.add_argument("--public-key", type=Path, required=True, help="the site's site.pub")
    add.add_argument("--dir", type=Path, default=Path("."), help="federation folder (default .)")
    add.set_defaults(handler=_add_site)

    start_parser = commands.add_parser(
        "start", help="run the SuperLink and the MLflow server (foreground; Ctrl-C stops)"
    )
    start_parser.add_argument("--dir", type=Path, default=Path("."), help="federation folder")
    start_parser.set_defaults(handler=_start)

    run_parser = commands.add_parser(
        "run", help="launch a federated run, follow it, exit with its real final status"
    )
    run_parser.add_argument("--dir", type=Path, default=Path("."), help="federation folder")
    run_parser.add_argument(
        "--app-dir",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="Flower app to run (default: RadFL's own)",
    )
    run_parser.add_argument("--rounds", type=int, help="federated rounds (run config num-rounds)")
    run_parser.add_argument(
        "--min-sites", type=int, help="sites to wait for before round 1 (run config min-sites)"
    )
    run_parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one run-config override, e.g. --set task=segmentation (repeatable)",
    )
    run_parser.add_argument(
        "--resume",
        metavar="RUN_KEY",
        help="continue run RUN_KEY from its last checkpoint (after a coordinator crash)",
    )
    run_parser.set_defaults(handler=_run)


def _init(args: argparse.Namespace) -> int:
    federation = init(
        args.dir,
        args.host,
        name=args.name,
        port=args.port,
        mlflow_port=args.mlflow_port,
        bind=args.bind,
    )
    print(f"federation {federation.name} in {federation.root}")
    print(f"  SuperLink {federation.address}, certificate for {', '.join(federation.hosts)}")
    print(f"  give each site {federation.ca_cert} (public); keep ca.key and superlink.key here")
    return 0


def _add_site(args: argparse.Namespace) -> int:
    stored = add_site(args.dir, args.name, args.public_key)
    print(f"site {args.name} registered: {stored}")
    return 0


def _start(args: argparse.Namespace) -> int:
    return start(args.dir)


def _run(args: argparse.Namespace) -> int:
    from simulations.simulate import parse_overrides

    overrides = parse_overrides(args.set)
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    if args.min_sites is not None:
        overrides["min-sites"] = args.min_sites
    if args.resume:
        overrides.update({"run-key": args.resume, "resume": True})
    return run(args.dir, args.app_dir, overrides)
