"""A site's ClientApp launcher: Flower's own SuperExec and ClientApp runner, with the app
bundle's signature checked before anything from the bundle is installed or imported.

``radfl site start`` runs ``flower-supernode --isolation process`` (the SuperNode then starts
no ClientApp itself) and, beside it, ``python -m client.launcher superexec``. That process is
Flower's ``run_superexec`` with one change: a ClientApp task starts ``radfl-clientapp`` (a
two-line shell script the daemon writes, ``python -m client.launcher clientapp``) instead of
``flwr-clientapp``. That process is Flower's ``flwr_clientapp`` with one change: the bundle's
bytes go through :func:`common.signing.verify` right before Flower's ``install_from_fab``.

A refused bundle raises :class:`common.signing.AppSignatureError` inside Flower's task, so
Flower replies to the ServerApp with an error whose reason is the refusal, and logs it at the
site. If this launcher is not running, the SuperNode runs no ClientApp at all (fail closed).

The trusted public keys come from the environment variable ``RADFL_TRUSTED_APP_KEYS`` (paths,
``os.pathsep``-separated), which the daemon sets; without it every bundle is refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import signing

TRUSTED_KEYS_ENV = "RADFL_TRUSTED_APP_KEYS"


def trusted_keys_from_env() -> list[Ed25519PublicKey]:
    paths = [p for p in os.environ.get(TRUSTED_KEYS_ENV, "").split(os.pathsep) if p]
    return [signing.load_public_key(Path(p)) for p in paths]


def clientapp_main() -> None:
    """Flower's ``flwr-clientapp``, refusing a bundle the site's trusted keys did not sign."""
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    guard(runtime, trusted_keys_from_env())
    flwr_clientapp()


def guard(
    runtime: Any, trusted: list[Ed25519PublicKey], *, forget_radfl_modules: bool = True
) -> None:
    """Wrap ``runtime.pull_task_input`` (to keep the run's ``app-signature``) and
    ``runtime.install_from_fab`` (to verify the bundle's bytes before installing them) in
    Flower's ClientApp runner module ``runtime``. Its loop and error replies stay Flower's:
    a refusal raised here becomes the task's error reply, after the message was pulled.
    ``forget_radfl_modules`` (off in tests only) makes Flower import the bundle's packages."""
    from flwr.supercore import log

    pull_task_input = runtime.pull_task_input
    install_from_fab = runtime.install_from_fab
    pulled: dict[str, str] = {}

    def pull_and_keep_signature(client: Any) -> Any:
        message, context, run, fab = pull_task_input(client)
        pulled["signature"] = str(context.run_config.get(signing.SIGNATURE_KEY, ""))
        pulled["run"] = str(run.run_id)
        return message, context, run, fab

    def install_if_signed(fab_file: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(fab_file, bytes):
            raise signing.AppSignatureError(f"{signing.REFUSAL}: not given as bytes")
        try:
            signature = signing.verify(fab_file, pulled.get("signature", ""), trusted)
        except signing.AppSignatureError as exc:
            log(logging.ERROR, "[radfl] run %s: %s", pulled.get("run", "?"), exc)
            raise
        log(
            logging.INFO,
            "[radfl] run %s: app bundle sha256 %s signed by key %s at %d: accepted",
            pulled.get("run", "?"),
            signing.fab_sha256(fab_file)[:16],
            signature.key_id,
            signature.signed_at,
        )
        if forget_radfl_modules:
            _forget_radfl_modules()
        return install_from_fab(fab_file, *args, **kwargs)

    runtime.pull_task_input = pull_and_keep_signature
    runtime.install_from_fab = install_if_signed


def _forget_radfl_modules() -> None:
    """Drop this launcher's own imports of RadFL's packages, so that Flower imports the
    ClientApp from the verified bundle (first on ``sys.path``), not from the site's install."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("client", "common"):
            del sys.modules[name]


def superexec_main(argv: list[str]) -> None:
    """Flower's SuperExec for a SuperNode in ``--isolation process``, launching ClientApps
    through ``--clientapp-command`` (the signature-checking runner) instead of Flower's."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.run_superexec import run_superexec

    parser = argparse.ArgumentParser(prog="python -m client.launcher superexec")
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--clientapp-command", required=True, type=Path)
    parser.add_argument("--parent-pid", type=int, default=None)
    args = parser.parse_args(argv)
    trusted_keys_from_env()  # a bad key file stops the launcher here, not at the first task
    # The executor looks the command up in this table for every launch.
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = str(args.clientapp_command.resolve())
    run_superexec(
        runtime_api_address=args.runtime_api_address,
        insecure=True,  # the SuperNode's runtime API on loopback (radfl site start)
        parent_pid=args.parent_pid,
        runtime_dependency_install=False,
    )


def write_clientapp_command(path: Path) -> Path:
    """The executable ``radfl-clientapp`` the SuperExec starts (this Python, this module)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    python = shlex.quote(sys.executable)
    path.write_text(f'#!/bin/sh\nexec {python} -m client.launcher clientapp "$@"\n')
    path.chmod(0o700)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["clientapp"]:
        sys.argv = [sys.argv[0], *argv[1:]]
        clientapp_main()
    elif argv[:1] == ["superexec"]:
        superexec_main(argv[1:])
    else:
        raise SystemExit("usage: python -m client.launcher {superexec|clientapp} ...")


if __name__ == "__main__":
    main()
