"""``radfl coordinator``: the federation folder, the SuperLink, MLflow and nginx, and runs.

A federation folder (mode 0700) holds everything the coordinator needs and nothing a site keeps
secret::

    DIR/federation.toml      name, host names, ports, bind addresses
    DIR/ca.crt, ca.key       the federation's certificate authority (see deploy/README.md for
                             keeping ca.key offline once the certificates are made)
    DIR/superlink.crt, .key  the TLS certificate (SANs: every --host, 127.0.0.1, localhost)
    DIR/sites/NAME.pub       each registered site's public key (`radfl coordinator add-site`)
    DIR/operators.htpasswd   the operators' MLflow passwords (`radfl coordinator add-operator`)
    DIR/app-signing.pub      the public key sites check app bundles with (beside ca.crt)
    DIR/state/app-signing.key  the Ed25519 key `run` signs each app bundle with (0600)
    DIR/flwr-home/           the Flower CLI's connection (FLWR_HOME) to the loopback SuperLink
    DIR/state/               SuperLink and MLflow databases, artifacts, nginx files, logs

``start`` runs, in the foreground until it is stopped, the SuperLink (TLS, SuperNode
authentication, persistent state) and an MLflow server, both on 127.0.0.1 only, and nginx in
front of them (``server/proxy.py``): sites reach only the Fleet API, operators reach MLflow with
a password, and the Control API answers on the coordinator machine only. It registers every
site's public key. ``run`` builds the app bundle, signs it (``common/signing.py``), submits it
with ``flwr run`` and exits with the run's real final status.
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

from common import pki, signing
from common.config import (
    ServerConfig,
    default_run_config,
    format_run_config,
    from_run_config,
    parse_overrides,
)
from common.errors import RadFLError
from server import proxy

SETTINGS = "federation.toml"
DEFAULT_PORT = 8000
DEFAULT_MLFLOW_PORT = 5000
#: Loopback ports of the SuperLink (all its APIs) and of the MLflow server behind nginx.
DEFAULT_SUPERLINK_LOCAL_PORT = 9093
DEFAULT_MLFLOW_LOCAL_PORT = 5001
LOOPBACK = "127.0.0.1"
#: Names in the TLS certificate besides the --hosts: the CLI, the ServerApp runner and nginx
#: reach the SuperLink on loopback, over TLS.
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
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
    mlflow_bind: str = LOOPBACK
    superlink_local_port: int = DEFAULT_SUPERLINK_LOCAL_PORT
    mlflow_local_port: int = DEFAULT_MLFLOW_LOCAL_PORT

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
    def operators_file(self) -> Path:
        return self.root / "operators.htpasswd"

    @property
    def signing_key(self) -> Path:
        return self.state / "app-signing.key"

    @property
    def signing_public_key(self) -> Path:
        return self.root / "app-signing.pub"

    @property
    def nginx_prefix(self) -> Path:
        return self.state / "nginx"

    @property
    def address(self) -> str:
        """Where sites dial the SuperLink (through nginx)."""
        return f"{self.hosts[0]}:{self.port}"

    @property
    def local_address(self) -> str:
        """The SuperLink itself, on loopback: where the Flower CLI (operators) dials."""
        return f"{LOOPBACK}:{self.superlink_local_port}"

    @property
    def mlflow_uri(self) -> str:
        """The MLflow server itself, on loopback: where the ServerApp tracks."""
        return f"http://{LOOPBACK}:{self.mlflow_local_port}"

    @property
    def operators_mlflow_url(self) -> str:
        """The operators' route to MLflow (TLS, password) through nginx."""
        host = self.hosts[0] if self.mlflow_bind in ("0.0.0.0", "::") else self.mlflow_bind
        return f"https://{_url_host(host)}:{self.mlflow_port}"

    def routes(self) -> proxy.Routes:
        return proxy.Routes(
            bind=self.bind,
            port=self.port,
            mlflow_bind=self.mlflow_bind,
            mlflow_port=self.mlflow_port,
            superlink_local_port=self.superlink_local_port,
            mlflow_local_port=self.mlflow_local_port,
            certificate=self.server_cert,
            key=self.server_key,
            ca_certificate=self.ca_cert,
            operators_file=self.operators_file,
        )

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
                # Folders made before the proxy lack these three: their defaults apply.
                mlflow_bind=str(data.get("mlflow-bind", LOOPBACK)),
                superlink_local_port=int(
                    data.get("superlink-local-port", DEFAULT_SUPERLINK_LOCAL_PORT)
                ),
                mlflow_local_port=int(data.get("mlflow-local-port", DEFAULT_MLFLOW_LOCAL_PORT)),
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
            f"mlflow-bind = {json.dumps(self.mlflow_bind)}\n"
            f"superlink-local-port = {self.superlink_local_port}\n"
            f"mlflow-local-port = {self.mlflow_local_port}\n"
        )

    def write_connection(self) -> None:
        """The Flower CLI's connection to this SuperLink on loopback, with absolute paths."""
        self.flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f"default = {json.dumps(self.name)}\n\n"
            f"[superlink.{self.name}]\n"
            f"address = {json.dumps(self.local_address)}\n"
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
    mlflow_bind: str = LOOPBACK,
    superlink_local_port: int = DEFAULT_SUPERLINK_LOCAL_PORT,
    mlflow_local_port: int = DEFAULT_MLFLOW_LOCAL_PORT,
) -> Federation:
    """Create a federation folder (mode 0700): CA, TLS certificate, settings, connection."""
    root = Path(root).resolve()
    if (root / SETTINGS).exists():
        raise RadFLError(f"{root} already holds a federation ({SETTINGS}); choose another folder")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", name):
        raise RadFLError(f"federation name {name!r} must be letters, digits, '-' and '_'")
    ports = [port, mlflow_port, superlink_local_port, mlflow_local_port]
    if len(set(ports)) != len(ports):
        raise RadFLError(
            f"--port, --mlflow-port, --superlink-local-port and --mlflow-local-port must differ "
            f"(got {ports})"
        )
    federation = Federation(
        root,
        name,
        tuple(hosts),
        port,
        mlflow_port,
        bind,
        mlflow_bind,
        superlink_local_port,
        mlflow_local_port,
    )
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    root.chmod(0o700)  # an existing empty folder too: it will hold ca.key
    federation.sites_dir.mkdir(mode=0o700, exist_ok=True)
    federation.state.mkdir(mode=0o700, exist_ok=True)
    ca_key, ca_cert = pki.make_ca(name)
    names = [*hosts, *(n for n in LOOPBACK_NAMES if n not in hosts)]
    server_key, server_cert = pki.make_server_certificate(ca_key, ca_cert, names)
    pki.write_private(root / "ca.key", pki.key_pem(ca_key))
    federation.ca_cert.write_bytes(pki.pem(ca_cert))
    pki.write_private(federation.server_key, pki.key_pem(server_key))
    federation.server_cert.write_bytes(pki.pem(server_cert))
    proxy.write_operators(federation.operators_file, {})
    signing.make_key_pair(federation.signing_key, federation.signing_public_key)
    federation.save()
    federation.write_connection()
    return federation


def rotate_signing_key(root: Path) -> tuple[str, Path | None]:
    """Replace the app-signing key; keep the old public key as ``app-signing.OLD_ID.pub`` for
    the sites' overlap. Returns the new key id and the retired public key's path."""
    federation = Federation.load(root)
    retired = None
    if federation.signing_public_key.exists():
        old = signing.load_public_key(federation.signing_public_key)
        retired = federation.root / f"app-signing.{signing.key_id(old)}.pub"
        federation.signing_public_key.replace(retired)
    federation.signing_key.unlink(missing_ok=True)
    return signing.make_key_pair(federation.signing_key, federation.signing_public_key), retired


def sign_app(federation: Federation, app_dir: Path) -> signing.Signature:
    """Build the app bundle as ``flwr run`` builds it (Flower's deterministic builder: the
    same bytes the sites receive) and sign its SHA-256."""
    from flwr.cli.build import build_fab_from_disk

    if not federation.signing_key.exists():
        raise RadFLError(
            f"{federation.signing_key}: no app-signing key (a federation made before signed "
            f"apps); make one with `radfl coordinator rotate-signing-key --dir {federation.root}` "
            f"and give every site the new {federation.signing_public_key.name}"
        )
    key = signing.load_private_key(federation.signing_key)
    return signing.sign(build_fab_from_disk(Path(app_dir).resolve()), key)


# ----------------------------------------------------------------------- operators
def add_operator(root: Path, name: str) -> str:
    """Give operator ``name`` a password for the MLflow route; return it (shown once).
    nginx reads the password file on every request: a running coordinator needs no restart."""
    return proxy.add_operator(Federation.load(root).operators_file, name)


def remove_operator(root: Path, name: str) -> None:
    """Revoke operator ``name``'s MLflow password, effective with the next request."""
    proxy.remove_operator(Federation.load(root).operators_file, name)


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
    """The SuperLink, the MLflow server and nginx of a federation, as child process groups."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = federation.state / "logs"
        #: Set from a signal handler: a start still waiting for health gives up at once.
        self.stopping = False

    def start(self) -> None:
        federation = self.federation
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        federation.write_connection()
        state = federation.state
        nginx = proxy.nginx_command(
            proxy.write_nginx_config(federation.routes(), federation.nginx_prefix),
            federation.nginx_prefix,
        )
        origins = {
            f"https://{_url_host(host)}:{federation.mlflow_port}"
            for host in (*federation.hosts, *LOOPBACK_NAMES, federation.mlflow_bind)
            if host not in ("0.0.0.0", "::")
        }
        self._spawn(
            "mlflow",
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", str(state / "mlartifacts"),
                "--host", LOOPBACK,
                "--port", str(federation.mlflow_local_port),
                "--workers", "1",
                # The UI is served through nginx's operators' route, under these origins.
                "--cors-allowed-origins", ",".join(sorted(origins)),
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
                "--host", LOOPBACK,
                "--port", str(federation.superlink_local_port),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        self._spawn("nginx", nginx)
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
        waiting = {
            "superlink": _superlink_healthy,
            "mlflow": _mlflow_healthy,
            "nginx": _fleet_route_healthy,
        }
        while waiting and time.monotonic() < deadline:
            if self.stopping:
                self.stop()
                raise RadFLError("stopped while starting")
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
    """Run the SuperLink, MLflow and nginx until SIGINT or SIGTERM; 1 if one of them dies."""
    federation = Federation.load(root)
    services = Services(federation)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = services.stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        services.start()
        print(
            f"[radfl] federation {federation.name}: sites dial {federation.address} (TLS, site "
            f"authentication, Fleet API only); operators: Control API at "
            f"{federation.local_address} (this machine), MLflow at "
            f"{federation.operators_mlflow_url} (password); "
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
    """Sign the app bundle, submit it with ``flwr run --stream``, then ask the SuperLink how it
    ended: 0 only for ``finished:completed`` (``flwr run --stream`` exits 0 even when the run
    failed)."""
    federation = Federation.load(root)
    federation.write_connection()
    values = {
        "run-key": uuid.uuid4().hex,
        "checkpoint-dir": str(federation.state / "checkpoints"),
        **site_registry_config(federation),
        **overrides,
    }
    from_run_config(ServerConfig, {**default_run_config(), **values})  # a typo fails here
    signature = sign_app(federation, app_dir)
    values[signing.SIGNATURE_KEY] = str(signature)
    print(f"[radfl] app bundle signed with key {signature.key_id}", flush=True)
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
    print(
        f"[radfl] run {run_id} ({values['run-key']}): {status}; "
        f"MLflow {federation.operators_mlflow_url}"
    )
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
    return _healthy(f"https://{federation.local_address}/health", federation.ca_cert)


def _fleet_route_healthy(federation: Federation) -> bool:
    """The SuperLink's health, asked through nginx's sites' listener."""
    host = LOOPBACK if federation.bind in ("0.0.0.0", "::") else federation.bind
    return _healthy(f"https://{_url_host(host)}:{federation.port}/health", federation.ca_cert)


def _healthy(url: str, ca_cert: Path) -> bool:
    try:
        return httpx.get(url, timeout=2.0, verify=str(ca_cert)).is_success
    except httpx.HTTPError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


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
        "--bind",
        default="0.0.0.0",
        help="address the sites' listener (nginx, Fleet API only) binds (default all)",
    )
    init_parser.add_argument(
        "--mlflow-bind",
        default=LOOPBACK,
        help="address the operators' MLflow route (nginx, TLS, password) binds (default "
        "127.0.0.1; name an operator network's address to open it there)",
    )
    init_parser.add_argument(
        "--superlink-local-port",
        type=int,
        default=DEFAULT_SUPERLINK_LOCAL_PORT,
        help="loopback port of the SuperLink itself (Control API for operators on this machine)",
    )
    init_parser.add_argument(
        "--mlflow-local-port",
        type=int,
        default=DEFAULT_MLFLOW_LOCAL_PORT,
        help="loopback port of the MLflow server itself",
    )
    init_parser.set_defaults(handler=_init)

    operator = commands.add_parser(
        "add-operator", help="give an operator a password for the MLflow route (printed once)"
    )
    operator.add_argument("name", help="the operator's name (lower case)")
    operator.add_argument("--dir", type=Path, default=Path("."), help="federation folder")
    operator.set_defaults(handler=_add_operator)

    unoperator = commands.add_parser("remove-operator", help="revoke an operator's password")
    unoperator.add_argument("name", help="the operator's name")
    unoperator.add_argument("--dir", type=Path, default=Path("."), help="federation folder")
    unoperator.set_defaults(handler=_remove_operator)

    rotate = commands.add_parser(
        "rotate-signing-key", help="replace the key app bundles are signed with (deploy/README.md)"
    )
    rotate.add_argument("--dir", type=Path, default=Path("."), help="federation folder")
    rotate.set_defaults(handler=_rotate_signing_key)

    add = commands.add_parser("add-site", help="register a site's public key")
    add.add_argument("name", help="the site's name (lower case, digits, dashes)")
    add.add_argument("--public-key", type=Path, required=True, help="the site's site.pub")
    add.add_argument("--dir", type=Path, default=Path("."), help="federation folder (default .)")
    add.set_defaults(handler=_add_site)

    start_parser = commands.add_parser(
        "start", help="run the SuperLink, MLflow and nginx (foreground; Ctrl-C stops)"
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
        mlflow_bind=args.mlflow_bind,
        superlink_local_port=args.superlink_local_port,
        mlflow_local_port=args.mlflow_local_port,
    )
    print(f"federation {federation.name} in {federation.root}")
    print(f"  sites dial {federation.address}, certificate for {', '.join(federation.hosts)}")
    print(f"  give each site {federation.ca_cert} (public); keep superlink.key here")
    print("  move ca.key to offline storage once you no longer need it (deploy/README.md)")
    print(f"  operators: radfl coordinator add-operator NAME --dir {args.dir}")
    print(
        f"  give each site {federation.signing_public_key} (public) with ca.crt: sites run only "
        "app bundles signed with its key (kept in state/)"
    )
    return 0


def _rotate_signing_key(args: argparse.Namespace) -> int:
    new_id, retired = rotate_signing_key(args.dir)
    federation = Federation.load(args.dir)
    print(f"new app-signing key {new_id}: give every site {federation.signing_public_key}")
    if retired is not None:
        print(f"  the old public key is kept as {retired}; sites may trust both while they switch")
    return 0


def _add_operator(args: argparse.Namespace) -> int:
    password = add_operator(args.dir, args.name)
    federation = Federation.load(args.dir)
    print(f"operator {args.name}: MLflow at {federation.operators_mlflow_url}")
    print(f"  user {args.name}")
    print(f"  password {password}")
    print("  (shown only now; give it to the operator over a private channel)")
    return 0


def _remove_operator(args: argparse.Namespace) -> int:
    remove_operator(args.dir, args.name)
    print(f"operator {args.name} removed; their password no longer opens MLflow")
    return 0


def _add_site(args: argparse.Namespace) -> int:
    stored = add_site(args.dir, args.name, args.public_key)
    print(f"site {args.name} registered: {stored}")
    return 0


def _start(args: argparse.Namespace) -> int:
    return start(args.dir)


def _run(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.rounds is not None:
        overrides["num-rounds"] = args.rounds
    if args.min_sites is not None:
        overrides["min-sites"] = args.min_sites
    if args.resume:
        overrides.update({"run-key": args.resume, "resume": True})
    return run(args.dir, args.app_dir, overrides)
