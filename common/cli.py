"""The ``radfl`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common.errors import RadFLError


def build_parser() -> argparse.ArgumentParser:
    from simulations import simulate

    parser = argparse.ArgumentParser(
        prog="radfl", description="Federated learning for radiology CNNs."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser(
        "simulate", help="run a federation of synthetic hospitals on this machine"
    )
    simulate.add_arguments(sim)
    sim.set_defaults(handler=_simulate)

    central = commands.add_parser(
        "centralized", help="train the same model on the pooled data of the synthetic hospitals"
    )
    simulate.add_arguments(central)
    central.set_defaults(handler=_centralized)

    models = commands.add_parser("models", help="list the registered models, tasks and strategies")
    models.set_defaults(handler=_list_registries)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


def _list_registries(args: argparse.Namespace) -> int:
    from common.models import list_models
    from common.tasks import list_tasks
    from server.strategies import list_strategies

    print("models:     ", ", ".join(list_models()))
    print("tasks:      ", ", ".join(list_tasks()))
    print("strategies: ", ", ".join(list_strategies()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
