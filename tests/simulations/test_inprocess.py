"""`radfl simulate` runs the federation in its own process through Flower's internal
`_run_simulation`: its use is checked here against the installed Flower, without a run (the
end-to-end tests of this folder run it)."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from simulations import inprocess
from simulations.local_superlink import descendants
from tests.simulations.conftest import REPO, tiny_simulate_command, tracking_env


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


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["local", "ray"])
def test_sigterm_stops_the_run_and_every_process_it_started(tmp_path: Path, backend: str):
    """Ray's `init` replaces the process's SIGTERM handler (exit at once, or abort with a
    stack dump); `radfl simulate` puts its own back, so a scheduler's SIGTERM stops the run
    as Ctrl-C does: exit code 130, the resume hint, and no Ray process left behind. With the
    sites in this process (`local`) there is no process but this one to stop."""
    command = [*tiny_simulate_command(sites=2, rounds=20), "--backend", backend]
    log = tmp_path / "run.out"
    with log.open("w") as out:
        run = subprocess.Popen(
            command, cwd=tmp_path, env=tracking_env(tmp_path), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    started: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            if "[radfl] round 1/20" in log.read_text():
                break
            time.sleep(0.2)
        assert run.poll() is None, log.read_text()[-3000:]
        started = descendants(run.pid)
        if backend == "ray":
            assert started  # Ray's processes, started by this one
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        for pid in [run.pid, *started]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    output = log.read_text()
    assert "radfl: interrupted; the simulation and its processes were stopped" in output
    assert "with the same options continues from the last checkpoint" in output
    assert "SIGTERM received" not in output  # Ray's crash handler did not take it
    time.sleep(2)
    alive = [pid for pid in started if psutil.pid_exists(pid) and _not_zombie(pid)]
    assert not alive, alive


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_starting_ray_leaves_this_processs_pythonpath_as_it_was(monkeypatch, tmp_path: Path):
    """Ray's processes get the app's path; this process's environment is put back, or every
    later child (a test's `radfl`, a tuning search's trial) imported from this run's path, and
    in CI one imported `common` from a deleted MLflow model folder."""
    import ray

    seen: dict = {}
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(env=os.environ["PYTHONPATH"], **kw))
    monkeypatch.setenv("PYTHONPATH", "/before")
    inprocess.start_ray({}, tmp_path)
    assert os.environ["PYTHONPATH"] == "/before"
    assert seen["env"].startswith(str(tmp_path)) and seen["env"].endswith("/before")
    assert seen["runtime_env"] == {"env_vars": {"PYTHONPATH": seen["env"]}}
    monkeypatch.delenv("PYTHONPATH")
    inprocess.start_ray({}, tmp_path)
    assert "PYTHONPATH" not in os.environ
