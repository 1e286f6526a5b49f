"""The ``radfl`` command: a dispatcher over the commands each package registers.

Each package (``client``, ``server``, ``simulations``) lists its commands in its own
``commands.py`` and registers them as entry points of the ``radfl.commands`` group in
``pyproject.toml``: the entry point's name is the command, its value a :class:`Command`. This
module imports none of them by name, and loads only the chosen command's package, so a
hospital's ``radfl site start`` never imports simulation code. A new command is a
:class:`Command` in its package's ``commands.py`` and one line in ``pyproject.toml`` (then
``pip install -e .``, which rewrites the installed entry points).
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points

from common.errors import RadFLError

GROUP = "radfl.commands"


@dataclass(frozen=True)
class Command:
    """One ``radfl`` subcommand.

    ``add_arguments`` fills in the subcommand's parser and sets its ``handler`` default (a
    function of the parsed arguments returning the exit code); it imports the modules the
    command needs, so that listing commands stays cheap.
    """

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]


def registered() -> dict[str, EntryPoint]:
    """The installed ``radfl.commands`` entry points by command name."""
    found = {point.name: point for point in entry_points(group=GROUP)}
    if not found:
        raise RadFLError(
            f"no radfl commands registered (entry point group {GROUP!r}): install the package "
            "with `pip install -e .` (or `make install`) so that its entry points are written"
        )
    return found


def load(point: EntryPoint) -> Command:
    command = point.load()
    if not isinstance(command, Command):
        raise RadFLError(f"entry point {point.name} = {point.value} is not a common.cli.Command")
    return command


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``radfl`` parser; with ``only``, only that command is loaded and filled in, so
    ``radfl simulate`` does not first import every other command's modules (torch, MONAI,
    MLflow), and ``radfl site`` imports nothing from ``simulations``."""
    points = registered()
    if only is not None:
        points = {only: points[only]}
    parser = argparse.ArgumentParser(
        prog="radfl", description="Federated learning for radiology CNNs."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, point in points.items():
        command = load(point)
        command.add_arguments(subparsers.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        only = argv[0] if argv and argv[0] in registered() else None
        args = build_parser(only).parse_args(argv)
        return int(args.handler(args))
    except RadFLError as exc:
        print(f"radfl: error: {exc}", file=sys.stderr)
        return 2


def console() -> None:
    """The ``radfl`` console script: :func:`main`, then out of the process without the
    interpreter's teardown.

    A command has ended what it runs (MLflow runs, servers, Ray) and closed its files when
    ``main`` returns; what is left is Python finalising torch, MONAI and MLflow's modules, 3 s
    of a 15 s ``radfl simulate`` on a quiet machine here and 16-33 s under load. What a normal
    exit does before that still happens: thread pools finish their queued work (MLflow's
    uploads), non-daemon threads are joined, exit hooks run (``atexit``: MLflow's flushing,
    temporary folders' finalizers).
    An exception (argparse's ``SystemExit`` included) leaves the usual way, traceback and all.
    """
    code = main()
    # In the interpreter's own order: thread pools drain, non-daemon threads are joined (a
    # thread that never ends would hold a normal exit too), then the exit hooks.
    _finish_pools()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _finish_pools() -> None:
    """Let ``concurrent.futures`` thread pools finish their queued work and stop, as the
    interpreter does at exit (their workers otherwise wait for more work forever)."""
    from concurrent.futures import thread as pool_threads

    pool_threads._python_exit()


if __name__ == "__main__":
    console()
