"""`radfl simulate` runs the federation in its own process through Flower's internal
`_run_simulation`: its use is checked here against the installed Flower, without a run (the
end-to-end tests of this folder run it)."""

from __future__ import annotations

import importlib
import inspect
import logging

from simulations import inprocess
from tests.simulations.conftest import REPO


def test_flowers_internal_run_simulation_still_takes_what_radfl_passes():
    flower = importlib.import_module("flwr.simulation.run_simulation")  # the module
    parameters = inspect.signature(flower._run_simulation).parameters
    passed = {
        "num_supernodes", "exit_event", "server_app_attr", "client_app_attr", "backend_name",
        "backend_config", "server_app_context", "app_dir", "run", "is_app", "verbose_logging",
    }  # fmt: skip
    assert passed <= set(parameters), sorted(passed - set(parameters))


def test_the_apps_are_the_ones_flwr_run_loads_from_the_app_folder():
    assert inprocess.app_components(REPO) == ("server.app:app", "client.app:app")


def test_without_verbose_only_progress_and_errors_are_shown():
    shown = inprocess.ProgressFilter()

    def record(message: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("flwr", level, __file__, 1, message, None, None)

    assert shown.filter(record("[radfl] round 1/2: train loss 0.7"))
    assert shown.filter(record("[ROUND 2/2]"))
    assert shown.filter(record("ServerApp crashed", logging.ERROR))
    assert not shown.filter(record("aggregate_train: Received 3 results and 0 failures"))
    assert not shown.filter(record("Starting Flower Simulation", logging.WARNING))


def test_ray_starts_with_only_what_a_simulation_needs():
    quiet = inprocess.backend_config(cpus_per_site=2, gpus_per_site=0.5, verbose=False)
    assert quiet["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert quiet["init_args"]["include_dashboard"] is False
    assert quiet["init_args"]["log_to_driver"] is False  # the sites' output: --verbose only
    verbose = inprocess.backend_config(cpus_per_site=1, gpus_per_site=0.0, verbose=True)
    assert verbose["init_args"]["log_to_driver"] is True
