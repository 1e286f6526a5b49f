"""A real federation on loopback, with the README's commands: a coordinator (SuperLink with TLS
and site authentication, MLflow server), three site daemons with their own synthetic data, a
site whose key was never registered and a SuperNode without TLS. The run completes with the
three good sites; its metrics are read back from the MLflow server over HTTP."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from simulations.local_superlink import free_port

RADFL = str(Path(sys.executable).parent / "radfl")
SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _radfl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [RADFL, *map(str, args)], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


class Processes:
    """Long-lived processes this test starts, each stopped by its PID (its process group)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.out").open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=self.root,
                env=_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started[name] = process
        return process

    def output(self, name: str) -> str:
        return (self.root / f"{name}.out").read_text(errors="replace")

    def stop_all(self) -> None:
        for process in self.started.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.started.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_for(predicate, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_coordinator_and_three_site_daemons_run_a_federation_over_tls(tmp_path: Path):
    port, mlflow_port = free_port(), free_port()
    # Coordinator: the federation folder, then each site's key, made at the site.
    _radfl(
        "coordinator", "init", "federation", "--host", "127.0.0.1", "--port", port,
        "--mlflow-port", mlflow_port, "--bind", "127.0.0.1", cwd=tmp_path,
    )  # fmt: skip
    _radfl(
        "synth", "--out", "hospitals", "--sites", "4", "--samples-per-site", "24",
        "--image-size", "32", cwd=tmp_path,
    )  # fmt: skip
    for site in ("site-0", "site-1", "site-2", "rogue"):
        _radfl("site", "keygen", f"keys/{site}", cwd=tmp_path)
    for site in ("site-0", "site-1", "site-2"):  # the rogue site's key is never registered
        _radfl(
            "coordinator", "add-site", site, "--public-key", f"keys/{site}/site.pub",
            "--dir", "federation", cwd=tmp_path,
        )  # fmt: skip
    assert not (tmp_path / "federation" / "sites" / "site.key").exists()
    assert (tmp_path / "keys" / "site-0" / "site.key").stat().st_mode & 0o077 == 0

    processes = Processes(tmp_path)
    try:
        coordinator = processes.start(
            "coordinator", [RADFL, "coordinator", "start", "--dir", "federation"]
        )
        _wait_for(
            lambda: (
                "[radfl] federation" in processes.output("coordinator")
                or coordinator.poll() is not None
            ),
            "the coordinator",
        )
        assert coordinator.poll() is None, processes.output("coordinator")
        assert "3 sites registered" in processes.output("coordinator")

        ca = "federation/ca.crt"
        address = f"127.0.0.1:{port}"
        for index, site in enumerate(("site-0", "site-1", "site-2", "rogue")):
            data = f"hospitals/site-{index}"
            processes.start(
                site,
                [
                    RADFL, "site", "start", "--superlink", address, "--data", data,
                    "--name", site, "--root-certificates", ca,
                    "--auth-key", f"keys/{site}/site.key", "--local-port", str(free_port()),
                ],
            )  # fmt: skip
        # A SuperNode without TLS, as a misconfigured site would start it.
        processes.start(
            "plaintext",
            [
                SUPERNODE, "--insecure", "--superlink", address, "--max-retries", "3",
                "--max-wait-time", "30", "--port", str(free_port()),
                "--node-config", 'data-path="hospitals/site-1" site-name="plaintext"',
            ],
        )  # fmt: skip

        done = subprocess.run(
            [
                RADFL, "coordinator", "run", "--dir", "federation", "--rounds", "2",
                "--min-sites", "3", "--set", "image-size=32", "--set", "local-epochs=1",
                "--set", "batch-size=8", "--set", "min-cell-size=2",
            ],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
        assert "finished:completed" in done.stdout

        # Metrics read back from the MLflow server over HTTP.
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("radfl")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "pooled/auc")
        assert sorted(m.step for m in history) == [0, 1, 2]
        sites = {key.split("/")[1] for key in run.data.metrics if key.startswith("site/")}
        assert sites == {"site-0", "site-1", "site-2"}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert "report/metrics.csv" in artifacts

        # Too few sites for a run: a clear error once the start deadline has passed.
        started = time.monotonic()
        short = subprocess.run(
            [
                RADFL, "coordinator", "run", "--dir", "federation", "--rounds", "1",
                "--min-sites", "5", "--set", "start-timeout-s=10",
            ],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert short.returncode == 1, short.stdout[-3000:]
        assert "3 site(s) connected after 10 s; the run needs 5 (min-sites)" in short.stdout
        assert "finished:failed" in short.stdout
        assert time.monotonic() - started < 120

        # The SuperLink refused the unregistered key and the plaintext SuperNode.
        rogue_log = (tmp_path / "hospitals/site-3/.radfl-logs/supernode.log").read_text()
        assert "Failed to activate SuperNode" in rogue_log, rogue_log[-2000:]
        assert "restarting in" in processes.output("rogue")  # the daemon keeps trying
        plaintext = processes.started["plaintext"]
        _wait_for(lambda: plaintext.poll() is not None, "the plaintext SuperNode to give up")
        assert plaintext.returncode != 0, processes.output("plaintext")[-2000:]
        assert "could not establish a connection" in processes.output("plaintext")
    finally:
        processes.stop_all()
    assert processes.started["coordinator"].returncode == 0
