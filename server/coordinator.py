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

The folder is ``server.federation``, the services ``server.services``; this module runs and the
command line.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common import signing
from common.config import (
    ServerConfig,
    default_run_config,
    format_run_config,
    from_run_config,
    parse_overrides,
)
from server.federation import (
    DEFAULT_MLFLOW_LOCAL_PORT,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_PORT,
    DEFAULT_SUPERLINK_LOCAL_PORT,
    LOOPBACK,
    SETTINGS,
    Federation,
    add_operator,
    add_site,
    init,
    json_tail,
    remove_operator,
    rotate_signing_key,
    sign_app,
    site_registry_config,
)
from server.services import start

__all__ = [  # the folder's and services' names, used through this module by tests and tools
    "SETTINGS",
    "Federation",
    "add_operator",
    "add_site",
    "init",
    "remove_operator",
    "rotate_signing_key",
    "run",
    "start",
]


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
    reply = json_tail(done.stdout)
    for entry in reply.get("runs", []):
        if str(entry.get("run-id")) == str(run_id):
            return str(entry.get("status", "unknown"))
    return f"unknown ({(done.stdout + done.stderr).strip()[-300:]})"


def _lines(stream: Any) -> Iterator[str]:
    yield from iter(stream.readline, "")


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
