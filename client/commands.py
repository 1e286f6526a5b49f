"""The commands a hospital site runs (``radfl site ...``), registered in ``pyproject.toml``."""

from __future__ import annotations

import argparse

from common.cli import Command


def _add_site_arguments(parser: argparse.ArgumentParser) -> None:
    from client import audit, check, daemon

    commands = parser.add_subparsers(dest="site_command", required=True)
    check_parser = commands.add_parser(
        "check", help="decode every image of a site folder and report each problem by row and file"
    )
    check.add_arguments(check_parser)
    check_parser.set_defaults(handler=check.site_check)
    keygen = commands.add_parser(
        "keygen", help="make the site's key pair (site.key stays, site.pub goes to the coordinator)"
    )
    daemon.add_keygen_arguments(keygen)
    keygen.set_defaults(handler=daemon.run_keygen)
    start = commands.add_parser(
        "start", help="check the site folder, then run its SuperNode (TLS, site key) as a daemon"
    )
    daemon.add_start_arguments(start)
    daemon.add_policy_arguments(start)
    start.set_defaults(handler=daemon.start)
    audit_parser = commands.add_parser(
        "audit", help="print what this site sent in a run, per message type, from its audit log"
    )
    audit.add_arguments(audit_parser)
    audit_parser.set_defaults(handler=audit.run)


site = Command(
    help="commands a hospital site runs next to its data", add_arguments=_add_site_arguments
)


def _add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    from client import predict as predict_module

    predict_module.add_arguments(parser)


predict = Command(
    help="run a logged model on studies (DICOM, NIfTI, PNG/JPEG, NumPy, a site manifest): "
    "probabilities, labels, masks",
    add_arguments=_add_predict_arguments,
)
