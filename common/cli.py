"""The ``radfl`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common.errors import RadFLError

COMMANDS = ("simulate", "centralized", "site", "coordinator", "synth", "bench", "report", "models")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``radfl`` parser; with ``only``, only that command's options are filled in, so
    ``radfl simulate`` does not first import every other command's modules (torch, MONAI,
    MLflow) before it starts the federation."""
    from simulations import simulate

    def wanted(command: str) -> bool:
        return only is None or only == command

    parser = argparse.ArgumentParser(
        prog="radfl", description="Federated learning for radiology CNNs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "simulate", help="run a federation of synthetic hospitals on this machine"
    )
    if wanted("simulate"):
        simulate.add_arguments(sim)
        simulate.add_evaluation_arguments(sim)
    sim.set_defaults(handler=_simulate)

    central = commands.add_parser(
        "centralized", help="train the same model on the pooled data of the synthetic hospitals"
    )
    if wanted("centralized"):
        simulate.add_arguments(central)
    central.set_defaults(handler=_centralized)

    site = commands.add_parser("site", help="commands a hospital site runs next to its data")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    check = site_commands.add_parser(
        "check", help="decode every image of a site folder and report each problem by row and file"
    )
    if wanted("site"):
        _add_site_check_arguments(check)
    check.set_defaults(handler=_site_check)
    keygen = site_commands.add_parser(
        "keygen", help="make the site's key pair (site.key stays, site.pub goes to the coordinator)"
    )
    if wanted("site"):
        _daemon().add_keygen_arguments(keygen)
    keygen.set_defaults(handler=lambda args: _daemon().run_keygen(args))
    start = site_commands.add_parser(
        "start", help="check the site folder, then run its SuperNode (TLS, site key) as a daemon"
    )
    if wanted("site"):
        _daemon().add_start_arguments(start)
        _daemon().add_policy_arguments(start)
    start.set_defaults(handler=lambda args: _daemon().start(args))
    audit = site_commands.add_parser(
        "audit", help="print what this site sent in a run, per message type, from its audit log"
    )
    if wanted("site"):
        _audit().add_arguments(audit)
    audit.set_defaults(handler=lambda args: _audit().run(args))

    coordinator = commands.add_parser(
        "coordinator", help="commands the coordinator runs: federation folder, services, runs"
    )
    if wanted("coordinator"):
        _coordinator().add_arguments(coordinator)

    synth = commands.add_parser(
        "synth", help="write synthetic hospitals to disk (DICOM, NIfTI, PNG) with manifests"
    )
    if wanted("synth"):
        _add_synth_arguments(synth)
    synth.set_defaults(handler=_synth)

    bench = commands.add_parser(
        "bench",
        help="benchmarks: federated against pooled and local training, overhead, traffic",
    )
    if wanted("bench"):
        _bench().add_arguments(bench)
    bench.set_defaults(handler=lambda args: _bench().bench(args))

    report = commands.add_parser(
        "report", help="regenerate a run's report (tables, plots, model card) from MLflow"
    )
    if wanted("report"):
        _add_report_arguments(report)
    report.set_defaults(handler=_report)

    models = commands.add_parser("models", help="list the registered models, tasks and strategies")
    models.set_defaults(handler=_list_registries)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(only).parse_args(argv)
    try:
        return int(args.handler(args))
    except RadFLError as exc:
        print(f"radfl: error: {exc}", file=sys.stderr)
        return 2


def _simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    return simulate(args)


def _centralized(args: argparse.Namespace) -> int:
    from simulations.centralized import centralized

    return centralized(args)


def _daemon() -> Any:
    from client import daemon

    return daemon


def _audit() -> Any:
    from client import audit

    return audit


def _coordinator() -> Any:
    from server import coordinator

    return coordinator


def _add_site_check_arguments(parser: argparse.ArgumentParser) -> None:
    from client import check

    check.add_arguments(parser)


def _site_check(args: argparse.Namespace) -> int:
    from client import check

    return check.site_check(args)


def _add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import synth

    synth.add_arguments(parser)


def _bench() -> Any:
    from simulations import bench

    return bench


def _synth(args: argparse.Namespace) -> int:
    from simulations import synth

    return synth.synth(args)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    from server import report_command

    report_command.add_arguments(parser)


def _report(args: argparse.Namespace) -> int:
    from server import report_command

    return report_command.report(args)


def _list_registries(args: argparse.Namespace) -> int:
    from common.models import list_models
    from common.tasks import list_tasks
    from server.strategies import list_strategies

    for task in list_tasks():
        print(f"{task + ' models:':<26}", ", ".join(list_models(task)))
    print(f"{'tasks:':<26}", ", ".join(list_tasks()))
    print(f"{'strategies:':<26}", ", ".join(list_strategies()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
