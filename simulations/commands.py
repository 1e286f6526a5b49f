"""The commands that run on synthetic hospitals (``radfl simulate``, ``centralized``, ``synth``,
``bench``, ``tune``), registered in ``pyproject.toml``."""

from __future__ import annotations

import argparse

from common.cli import Command


def _add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import simulate as module

    module.add_arguments(parser)
    module.add_evaluation_arguments(parser)
    parser.set_defaults(handler=module.simulate)


def _add_centralized_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import centralized as module
    from simulations import simulate as options

    options.add_arguments(parser)
    parser.set_defaults(handler=module.centralized)


def _add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import synth_command as module

    module.add_arguments(parser)
    parser.set_defaults(handler=module.synth)


def _add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import ensemble as module

    module.add_arguments(parser)


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations.bench import parts as module

    module.add_arguments(parser)
    parser.set_defaults(handler=module.bench)


def _add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from simulations import tune as module

    module.add_arguments(parser)
    parser.set_defaults(handler=module.tune)


simulate = Command(
    help="run a federation of synthetic hospitals on this machine",
    add_arguments=_add_simulate_arguments,
)
centralized = Command(
    help="train the same model on the pooled data of the synthetic hospitals",
    add_arguments=_add_centralized_arguments,
)
synth = Command(
    help="write synthetic hospitals to disk (DICOM, NIfTI, PNG) with manifests",
    add_arguments=_add_synth_arguments,
)
bench = Command(
    help="benchmarks: federated against pooled and local training, overhead, traffic",
    add_arguments=_add_bench_arguments,
)
ensemble = Command(
    help="evaluate several runs' models, or one run's best rounds, as an ensemble (mean of "
    "probabilities) against its best member",
    add_arguments=_add_ensemble_arguments,
)
tune = Command(
    help="search learning rate, local epochs, batch size, proximal mu and server learning rate "
    "over simulated federations (Optuna); writes the best config for simulate --config",
    add_arguments=_add_tune_arguments,
)
