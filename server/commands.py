"""The coordinator's commands (``radfl coordinator``, ``radfl report``, ``radfl models``),
registered in ``pyproject.toml``."""

from __future__ import annotations

import argparse

from common.cli import Command


def _add_coordinator_arguments(parser: argparse.ArgumentParser) -> None:
    from server import coordinator

    coordinator.add_arguments(parser)


def _add_report_arguments(parser: argparse.ArgumentParser) -> None:
    from server import report_command

    report_command.add_arguments(parser)
    parser.set_defaults(handler=report_command.report)


def _list_registries(args: argparse.Namespace) -> int:
    from common.models import list_models
    from common.tasks import list_tasks
    from server.strategies import list_strategies

    for task in list_tasks():
        print(f"{task + ' models:':<26}", ", ".join(list_models(task)))
    print(f"{'tasks:':<26}", ", ".join(list_tasks()))
    print(f"{'strategies:':<26}", ", ".join(list_strategies()))
    return 0


coordinator = Command(
    help="commands the coordinator runs: federation folder, services, runs",
    add_arguments=_add_coordinator_arguments,
)
report = Command(
    help="regenerate a run's report (tables, plots, model card) from MLflow",
    add_arguments=_add_report_arguments,
)
models = Command(
    help="list the registered models, tasks and strategies",
    add_arguments=lambda parser: parser.set_defaults(handler=_list_registries),
)
