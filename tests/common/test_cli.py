"""``radfl`` only dispatches: commands come from the packages' entry points, and a site's
commands load no simulation code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from common.cli import Command, build_parser, main, registered

COMMANDS = {
    "simulate",
    "centralized",
    "site",
    "predict",
    "coordinator",
    "synth",
    "bench",
    "report",
    "models",
    "ensemble",
    "tune",
}


def test_every_command_is_registered_as_an_entry_point_of_its_package() -> None:
    points = registered()
    assert set(points) == COMMANDS
    owners = {name: point.value.split(".")[0] for name, point in points.items()}
    assert owners["site"] == owners["predict"] == "client" and owners["coordinator"] == "server"
    assert owners["simulate"] == "simulations"
    assert all(isinstance(point.load(), Command) for point in points.values())


def test_radfl_site_help_imports_nothing_from_simulations() -> None:
    """A hospital runs ``radfl site start``: neither building its parser nor its ``--help``
    (which parses all of ``site``'s options) may import the simulation package."""
    script = textwrap.dedent(
        """
        import sys
        from common.cli import build_parser, main
        build_parser("site")
        try:
            main(["site", "--help"])
        except SystemExit:
            pass
        try:
            main(["site", "start", "--help"])
        except SystemExit:
            pass
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "simulations")
        print("LOADED", loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "--superlink" in result.stdout  # the help really was built
    assert "LOADED []" in result.stdout, result.stdout


def test_the_full_parser_knows_every_command_and_an_unknown_one_is_refused(capsys) -> None:
    parser = build_parser()
    args = parser.parse_args(["coordinator", "init", "fed", "--host", "127.0.0.1"])
    assert args.handler.__name__ == "_init"
    with pytest.raises(SystemExit):
        main(["no-such-command"])
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
