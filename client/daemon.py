"""``radfl site keygen`` and ``radfl site start``: a hospital site's long-lived daemon.

``keygen`` makes the site's authentication key pair; only ``site.pub`` goes to the coordinator.
``start`` checks the site folder (the data check of ``radfl site check``), then runs Flower's
SuperNode over TLS with the site's key, and keeps it running: when the SuperNode exits (the
network went away longer than it retries, the coordinator restarted), it is started again after
a growing pause. The SuperNode runs in ``--isolation process``: its ClientApps are started by
RadFL's launcher (``client/launcher.py``), which runs only app bundles signed with a key the
site trusts (``--trusted-key``, the coordinator's ``app-signing.pub``). Everything is logged
to a local file; nothing but weights, metric states and counts leaves the site.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from client import check, launcher
from client.site import LOG_FOLDER
from common import pki, signing
from common.errors import RadFLError
from common.tasks import list_tasks

#: Restart pauses after the SuperNode exits: doubling from 2 s up to 5 minutes.
FIRST_PAUSE_S = 2.0
LONGEST_PAUSE_S = 300.0
#: The coordinator's app-signing public key, looked for beside ca.crt in the site kit.
TRUSTED_KEY_NAME = "app-signing.pub"
#: Flower's default port of the SuperNode's runtime API (``flower-supernode --port``).
DEFAULT_LOCAL_PORT = 9094


def keygen(folder: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write ``site.key`` (owner-only) and ``site.pub`` into ``folder``."""
    folder = Path(folder)
    private, public = folder / "site.key", folder / "site.pub"
    if private.exists() and not force:
        raise RadFLError(f"{private} exists; keep it, or pass --force to replace the site's key")
    if force:
        private.unlink(missing_ok=True)
    key, pub = pki.site_key_pair()
    pki.write_private(private, key)
    public.write_bytes(pub)
    return private, public


def supernode_command(
    *,
    superlink: str,
    data: Path,
    name: str,
    root_certificates: Path,
    auth_key: Path,
    port: int | None,
    extra_config: dict[str, str | int | float | bool],
    signed_apps_only: bool = True,
) -> list[str]:
    """The ``flower-supernode`` command of a site (never ``--insecure``). With
    ``signed_apps_only`` it starts no ClientApp itself (``--isolation process``): RadFL's
    launcher does, after checking the bundle's signature."""
    config = {"data-path": str(Path(data).resolve()), "site-name": name, **extra_config}
    command = [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(Path(root_certificates).resolve()),
        "--auth-supernode-private-key", str(Path(auth_key).resolve()),
        "--node-config", " ".join(f"{k}={json.dumps(v)}" for k, v in config.items()),
    ]  # fmt: skip
    # The SuperNode's own runtime API serves its ClientApp processes: loopback only.
    command += ["--host", "127.0.0.1"]
    if port is not None:
        command += ["--port", str(port)]
    if signed_apps_only:
        command += ["--isolation", "process"]
    return command


def launcher_command(*, local_port: int, clientapp_command: Path, parent_pid: int) -> list[str]:
    """RadFL's SuperExec (``client/launcher.py``) for the SuperNode of process ``parent_pid``."""
    return [
        sys.executable, "-m", "client.launcher", "superexec",
        "--runtime-api-address", f"127.0.0.1:{local_port}",
        "--clientapp-command", str(clientapp_command),
        "--parent-pid", str(parent_pid),
    ]  # fmt: skip


def trusted_keys(paths: list[Path] | None, root_certificates: Path) -> list[Path]:
    """The coordinator's app-signing public keys a site trusts (default: ``app-signing.pub``
    beside ``ca.crt``), each checked to be an Ed25519 public key."""
    chosen = paths or [Path(root_certificates).parent / TRUSTED_KEY_NAME]
    for path in chosen:
        if not Path(path).is_file():
            raise RadFLError(
                f"--trusted-key {path}: no such file; a site needs the coordinator's "
                f"{TRUSTED_KEY_NAME} (in the site kit, beside ca.crt) to run signed apps "
                "(--allow-unsigned-apps is for tests only)"
            )
        signing.load_public_key(Path(path))
    return [Path(p).resolve() for p in chosen]


def start(args: argparse.Namespace) -> int:
    """Check the site, then run its SuperNode until SIGINT or SIGTERM, restarting it when it
    exits. 1 when the site check fails (nothing is started)."""
    data = Path(args.data).resolve()
    name = pki.check_site_name(args.name)
    pki.check_site_private_key(args.auth_key)
    if not Path(args.root_certificates).is_file():
        raise RadFLError(f"--root-certificates {args.root_certificates}: no such file")
    signed_apps_only = not args.allow_unsigned_apps
    keys = [] if not signed_apps_only else trusted_keys(args.trusted_key, args.root_certificates)
    log_dir = data / LOG_FOLDER
    # The logs can name patients and files: readable by the site's service account only.
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    log_dir.chmod(0o700)
    log_path = log_dir / "site.log"

    def log(message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} [radfl site {name}] {message}"
        print(line, flush=True)
        with log_path.open("a") as handle:
            handle.write(line + "\n")

    if args.skip_check:
        log("site check skipped (--skip-check)")
    else:
        log(f"checking {data} for task {args.task} ({args.dims}D)")
        report = check.check_site(
            data, task=args.task, spatial_dims=args.dims, num_classes=args.num_classes
        )
        report.write_json(data / check.REPORT_NAME)
        if not report.ok and not args.skip_bad_rows:
            log(f"site check failed; see {data / check.REPORT_NAME}:\n{report.format_text()}")
            return 1
        log(f"site check: {report.rows} rows, {len(report.problems)} problems")
    extra: dict[str, str | int | float | bool] = {}
    if args.skip_bad_rows:
        extra["skip-bad-rows"] = True
    extra.update(policy_node_config(args))
    command = supernode_command(
        superlink=args.superlink,
        data=data,
        name=name,
        root_certificates=args.root_certificates,
        auth_key=args.auth_key,
        port=args.local_port,
        extra_config=extra,
        signed_apps_only=signed_apps_only,
    )
    if signed_apps_only:
        clientapp_command = launcher.write_clientapp_command(log_dir / "bin" / "radfl-clientapp")
        log(f"running only app bundles signed by {', '.join(str(k) for k in keys)}")
    else:
        log("WARNING: --allow-unsigned-apps: this site runs any app bundle (tests only)")
    env = dict(os.environ)
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env[launcher.TRUSTED_KEYS_ENV] = os.pathsep.join(str(k) for k in keys)
    stopping = False
    children: list[subprocess.Popen[bytes]] = []

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:  # the loop below waits for them
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    pause = FIRST_PAUSE_S
    try:
        while not stopping:
            log(f"connecting to {args.superlink} (TLS, key {Path(args.auth_key).name})")
            started = time.monotonic()
            with (log_dir / "supernode.log").open("ab") as output:
                children[:] = [_spawn(command, env, output)]
                if signed_apps_only:
                    children.append(
                        _spawn(
                            launcher_command(
                                local_port=args.local_port or DEFAULT_LOCAL_PORT,
                                clientapp_command=clientapp_command,
                                parent_pid=children[0].pid,
                            ),
                            env,
                            output,
                        )
                    )
                # The SuperNode and its launcher live and die together.
                while all(child.poll() is None for child in children):
                    time.sleep(0.2)
                names = ("SuperNode", "ClientApp launcher")
                code, name = next(
                    (child.returncode, name)
                    for child, name in zip(children, names, strict=False)
                    if child.returncode is not None
                )
                _terminate(children)
            if stopping:
                break
            if time.monotonic() - started > LONGEST_PAUSE_S:
                pause = FIRST_PAUSE_S  # it ran a good while: start over
            log(f"{name} exited with code {code}; restarting in {pause:.0f} s")
            deadline = time.monotonic() + pause
            while not stopping and time.monotonic() < deadline:
                time.sleep(0.2)
            pause = min(pause * 2, LONGEST_PAUSE_S)
    finally:
        _terminate(children)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log("stopped")
    return 0


def _spawn(command: list[str], env: dict[str, str], output: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
    )


def _terminate(children: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """SIGTERM each child's process group, then SIGKILL what is left after ``timeout_s``."""
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()


# ----------------------------------------------------------------------------- CLI
def add_keygen_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "dir", type=Path, nargs="?", default=Path("."), help="where site.key and site.pub go"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")


def run_keygen(args: argparse.Namespace) -> int:
    private, public = keygen(args.dir, force=args.force)
    print(f"private key {private} (stays here, readable by you only)")
    print(f"public key  {public} (send this file to the coordinator)")
    return 0


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="the coordinator's HOST:PORT")
    parser.add_argument("--data", type=Path, required=True, help="the site folder (manifest.csv)")
    parser.add_argument("--name", required=True, help="the site's registered name")
    parser.add_argument(
        "--root-certificates", type=Path, required=True, help="the federation's ca.crt"
    )
    parser.add_argument("--auth-key", type=Path, required=True, help="the site's site.key")
    parser.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=None,
        help=f"the coordinator's app-signing public key (default: {TRUSTED_KEY_NAME} beside "
        "--root-certificates); repeat it to trust an old and a new key while keys rotate",
    )
    parser.add_argument(
        "--allow-unsigned-apps",
        action="store_true",
        help="run app bundles without checking their signature: for tests only",
    )
    parser.add_argument("--task", default="classification", choices=list_tasks(), help="data check")
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3), help="data check")
    parser.add_argument("--num-classes", type=int, default=2, help="data check")
    parser.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="train on the rows that pass the check instead of refusing to start",
    )
    parser.add_argument("--skip-check", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--local-port",
        type=int,
        default=None,
        help="loopback port of the SuperNode's runtime API (distinct per site on one machine)",
    )


# ------------------------------------------------------------------ disclosure policy
def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """``radfl site start`` options of the site's disclosure policy (``client.disclosure``)."""
    from client import disclosure

    group = parser.add_argument_group(
        "disclosure policy", "what this site answers, whatever the run asks (client.disclosure)"
    )
    group.add_argument(
        "--subgroup-attributes",
        default=",".join(disclosure.DEFAULT_ATTRIBUTES),
        help="subgroup attributes the site reports, comma-separated (default %(default)s); "
        "others are refused, identifiers always",
    )
    group.add_argument(
        "--min-cell-size",
        type=int,
        default=disclosure.DEFAULT_MIN_CELL_SIZE,
        help="the site's floor k: subgroup cells of fewer patients are never sent, whatever "
        "the run's min-cell-size (default %(default)s)",
    )
    group.add_argument(
        "--max-evaluations",
        type=int,
        default=disclosure.DEFAULT_MAX_EVALUATIONS,
        help="evaluations the site answers per run (default %(default)s)",
    )
    group.add_argument(
        "--max-evaluations-per-model",
        type=int,
        default=disclosure.DEFAULT_MAX_EVALUATIONS_PER_MODEL,
        help="evaluations of one model the site answers per run (default %(default)s)",
    )
    group.add_argument(
        "--dp-epsilon",
        type=float,
        default=0.0,
        help="the site's privacy budget: train only with DP-SGD, and stop at this epsilon "
        "(default 0: no budget of its own)",
    )


def policy_node_config(args: argparse.Namespace) -> dict[str, str | int | float | bool]:
    """The policy options as node config keys, checked (a bad one names its key)."""
    from client import disclosure

    config: dict[str, str | int | float | bool] = {
        disclosure.ATTRIBUTES_KEY: args.subgroup_attributes,
        disclosure.MIN_CELL_SIZE_KEY: args.min_cell_size,
        disclosure.MAX_EVALUATIONS_KEY: args.max_evaluations,
        disclosure.MAX_EVALUATIONS_PER_MODEL_KEY: args.max_evaluations_per_model,
        disclosure.DP_EPSILON_KEY: args.dp_epsilon,
    }
    disclosure.DisclosurePolicy.from_node_config(config)
    return config
