"""A coordinator's federation folder: its settings, CA and TLS certificate, app-signing key,
operators and registered sites (``radfl coordinator init``, ``add-site``, ``add-operator``,
``rotate-signing-key``). The folder's layout is in ``server.coordinator``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from common import pki, signing
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
        return f"https://{url_host(host)}:{self.mlflow_port}"

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
    if superlink_running(federation):
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
        reply = json_tail(done.stdout)
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


def json_tail(text: str) -> dict[str, Any]:
    """The JSON object a Flower CLI command printed last (it may print other lines first)."""
    start = text.find("{")
    while start != -1:
        with contextlib.suppress(json.JSONDecodeError):
            value = json.loads(text[start:])
            if isinstance(value, dict):
                return value
        start = text.find("{", start + 1)
    return {}


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------------- health
def superlink_healthy(federation: Federation) -> bool:
    return _healthy(f"https://{federation.local_address}/health", federation.ca_cert)


def fleet_route_healthy(federation: Federation) -> bool:
    """The SuperLink's health, asked through nginx's sites' listener."""
    host = LOOPBACK if federation.bind in ("0.0.0.0", "::") else federation.bind
    return _healthy(f"https://{url_host(host)}:{federation.port}/health", federation.ca_cert)


def _healthy(url: str, ca_cert: Path) -> bool:
    try:
        return httpx.get(url, timeout=2.0, verify=str(ca_cert)).is_success
    except httpx.HTTPError:
        return False


def mlflow_healthy(federation: Federation) -> bool:
    try:
        return httpx.get(f"{federation.mlflow_uri}/health", timeout=2.0).is_success
    except httpx.HTTPError:
        return False


def superlink_running(federation: Federation) -> bool:
    return (federation.state / "services.json").exists() and superlink_healthy(federation)
