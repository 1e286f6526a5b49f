"""`radfl simulate --ray-address`: a tiny simulation whose sites run on a Ray cluster started
beforehand with `ray start --head` on loopback (as on a first machine of several), which the
test stops by the PIDs it started (never `ray stop`, which stops every Ray on the machine)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import cli
from simulations.local_superlink import descendants, free_port
from tests.simulations.conftest import run_radfl, the_run, tiny_simulate_command, tracking_env

RAY = str(Path(sys.executable).parent / "ray")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reap our own child so that it stops counting as alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A Ray head on 127.0.0.1 with 2 CPUs: its address and its own temp folder (not
    /tmp/ray, so that no other Ray user on this machine finds and joins it)."""
    temp = Path(tempfile.mkdtemp(prefix="radfl-ray-", dir="/tmp"))  # short: Ray's socket paths
    port = free_port()
    ports = {
        option: str(free_port())
        for option in (
            "--ray-client-server-port",
            "--dashboard-agent-listen-port",
            "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port",
            "--metrics-export-port",
            "--node-manager-port",
            "--object-manager-port",
        )
    }
    command = [
        RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
        "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--temp-dir", str(temp),
        "--include-dashboard", "false", "--disable-usage-stats",
        *(part for item in ports.items() for part in item),
    ]  # fmt: skip
    log = temp / "head.out"
    with log.open("wb") as out:
        head = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and head.poll() is None:
            if _listening(port) and "Ray runtime started" in log.read_text(errors="replace"):
                break
            time.sleep(0.5)
        assert head.poll() is None and _listening(port), log.read_text(errors="replace")[-3000:]
        yield f"127.0.0.1:{port}", temp
    finally:
        _stop([*descendants(head.pid), head.pid])
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_simulate_runs_its_sites_on_an_existing_ray_cluster(
    tmp_path: Path, ray_head: tuple[str, Path]
):
    address, ray_temp = ray_head
    env = tracking_env(tmp_path)
    env.pop("RAY_ADDRESS", None)  # only --ray-address points the run at the cluster
    command = tiny_simulate_command(sites=2, rounds=1)
    output = run_radfl([*command, "--ray-address", address, "--cpus-per-site", "1"], tmp_path, env)
    assert f"Ray cluster {address}" in output
    _, run = the_run(tmp_path, "federated")
    assert run.info.status == "FINISHED"
    # The sites ran as workers of this cluster: their logs are in its session folder.
    logs = ray_temp / "session_latest" / "logs"
    workers = list(logs.glob("worker-*.out"))
    assert workers, sorted(p.name for p in logs.iterdir())
    assert any("ClientAppActor" in p.read_text(errors="replace") for p in workers), [
        p.name for p in workers
    ]


def test_a_malformed_ray_address_is_refused_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    argv = tiny_simulate_command(sites=2, rounds=1)[1:]  # without the console script's path
    assert cli.main([*argv, "--ray-address", "nohost"]) == 2
    assert "--ray-address 'nohost': expected HOST:PORT of the Ray head" in capsys.readouterr().err
