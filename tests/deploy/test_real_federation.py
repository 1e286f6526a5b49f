"""A real federation on loopback, with the README's commands: a coordinator (SuperLink with TLS
and site authentication and MLflow, both on 127.0.0.1, behind nginx), three site daemons with
their own synthetic data, a site whose key was never registered and a SuperNode without TLS.

The coordinator's public address is 127.0.0.2 (a second loopback address), so the test can
tell "reachable from the network" from "reachable on the coordinator machine". An outsider
holding only ``ca.crt`` tries the Control API through the public address with the real ``flwr``
CLI and is refused by nginx's message; the SuperLink's and MLflow's own ports do not answer on
the public address; MLflow's operators' route refuses a missing or wrong password. The run
completes with the three good sites; its metrics are read back through the operators' route.
The sites run only app bundles the coordinator signed: the same app submitted unsigned
(``flwr run`` of the folder, on the coordinator machine) is refused by every site, by message."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from mlflow.tracking import MlflowClient

from common import cli, signing
from common.errors import RadFLError
from server import proxy
from simulations.local_superlink import free_port

RADFL = str(Path(sys.executable).parent / "radfl")
SUPERNODE = str(Path(sys.executable).parent / "flower-supernode")

FLWR = str(Path(sys.executable).parent / "flwr")
ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "127.0.0.2"  # the coordinator's "network" address; 127.0.0.1 is its loopback

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _nginx_installed() -> None:
    """Without nginx the coordinator cannot start: skip on a workstation, fail in CI."""
    try:
        proxy.nginx_binary()
    except RadFLError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install nginx (.ci/run): {exc}")
        pytest.skip(str(exc))


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
    """A one-shot ``radfl`` command (init, keygen, add-site, ...) in ``cwd``, run in this
    process through ``common.cli.main``, the console script's own function: the same parsing
    and code, without a new interpreter importing torch and MONAI for each of a dozen commands
    (6-10 s each here). The long-lived commands (coordinator start/run, site start) run as
    real processes of the console script below."""
    argv = [str(arg) for arg in args]
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(argv)
    finally:
        os.chdir(previous)
    assert code == 0, out.getvalue() + err.getvalue()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


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


def _seconds_to_exit(process: subprocess.Popen[bytes], started: float) -> float:
    """Seconds from ``started`` to ``process``'s exit."""
    process.wait(timeout=300)
    return time.monotonic() - started


def _outsider_flwr(home: Path, *args: str | Path) -> subprocess.Popen[str]:
    """The real ``flwr`` CLI as the outsider runs it, started (the attempts run side by side:
    each is mostly the CLI's own start-up)."""
    env = _env()
    env["FLWR_HOME"] = str(home)
    return subprocess.Popen(
        [FLWR, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finished(process: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _refused_by_nginx(done: subprocess.CompletedProcess[str]) -> bool:
    text = " ".join((done.stdout + done.stderr).replace("│", " ").split())
    return done.returncode != 0 and proxy.REFUSAL in text


def _play_the_outsider(tmp_path: Path, port: int, local_ports: list[int]) -> None:
    """With only ca.crt and the public address: no steering, no MLflow."""
    outsider = tmp_path / "outsider"
    (outsider / "home").mkdir(parents=True)
    ca = outsider / "ca.crt"
    ca.write_bytes((tmp_path / "federation/ca.crt").read_bytes())
    (outsider / "home/config.toml").write_text(
        '[superlink]\ndefault = "coordinator"\n\n[superlink.coordinator]\n'
        f'address = "{PUBLIC}:{port}"\nroot-certificates = "{ca}"\n'
    )
    _radfl("site", "keygen", outsider / "key", cwd=tmp_path)
    attempts = {
        "register a node": ("supernode", "register", outsider / "key/site.pub", "coordinator"),
        "unregister a node": ("supernode", "unregister", "1", "coordinator"),
        "list runs": ("ls", "coordinator"),
        "stop a run": ("stop", "1", "coordinator"),
        "read logs": ("log", "1", "coordinator"),
        "start a run": ("run", ROOT, "coordinator"),
    }
    started = {what: _outsider_flwr(outsider / "home", *args) for what, args in attempts.items()}
    for what, process in started.items():
        done = _finished(process)
        assert _refused_by_nginx(done), (what, done.stdout[-2000:], done.stderr[-2000:])
    base = f"https://{PUBLIC}:{port}"
    with httpx.Client(verify=str(ca), timeout=10.0) as client:
        assert client.get(f"{base}/health").status_code == 200  # what sites need answers
        for method, path in (
            ("GET", "/openapi.json"),
            ("GET", "/docs"),
            ("POST", "/v1/control/start-run"),
            ("POST", "/v1/runtime/get-run"),
            ("POST", "/v1/fleet/../control/list-runs"),
            ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
        ):
            reply = client.request(method, f"{base}{path}")
            assert reply.status_code == 403, (path, reply.text)
            assert reply.json()["detail"] == proxy.REFUSAL, path
        # The SuperLink's and MLflow's own ports listen on 127.0.0.1 only.
        for local_port in local_ports:
            with pytest.raises(httpx.ConnectError):
                client.get(f"https://{PUBLIC}:{local_port}/health")


def _assert_mlflow_needs_a_password(mlflow_port: int, ca: Path) -> None:
    with httpx.Client(verify=str(ca), timeout=10.0) as client:
        # The operators' route listens on the coordinator's loopback only (--mlflow-bind).
        with pytest.raises(httpx.ConnectError):
            client.get(f"https://{PUBLIC}:{mlflow_port}/")
        url = f"https://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search"
        for auth in (None, ("alice", "not-her-password"), ("mallory", "x")):
            reply = client.get(url, params={"max_results": 10}, auth=auth)
            assert reply.status_code == 401, (auth, reply.text[:300])
            assert "401 Authorization Required" in reply.text


def _assert_sites_refuse_an_unsigned_app(tmp_path: Path) -> None:
    """An operator's plain ``flwr run`` of the app folder: the bundle reaches the sites
    unsigned, and each site's launcher refuses it before installing it; the refusal is the
    error reply the ServerApp logs. The run is then stopped (it would keep the model)."""
    env = _env()
    env["FLWR_HOME"] = str(tmp_path / "federation/flwr-home")
    settings = "num-rounds=1 min-sites=3 image-size=32 local-epochs=1 batch-size=8"
    started = subprocess.run(
        [FLWR, "run", ROOT, "radfl", "--run-config", settings, "--format", "json"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert '"success": true' in started.stdout, started.stdout + started.stderr
    run_id = started.stdout.split('"run-id": "', 1)[1].split('"', 1)[0]
    logs = [tmp_path / f"hospitals/site-{i}/.radfl-logs/supernode.log" for i in range(3)]
    refusal = f"run {run_id}: {signing.REFUSAL}: it is unsigned"
    _wait_for(
        lambda: all(refusal in log.read_text(errors="replace") for log in logs),
        "every site to refuse the unsigned bundle",
        timeout_s=180,
    )
    # No code from the refused bundle was installed at any site.
    for index in range(3):
        assert f"run {run_id}: app bundle sha256" not in logs[index].read_text(errors="replace")

    # The coordinator sees why: each site's error reply names the refusal.
    def run_log() -> str:
        shown = [FLWR, "log", run_id, "radfl", "--show"]
        return subprocess.run(shown, env=env, capture_output=True, text=True, timeout=60).stdout

    _wait_for(lambda: signing.REFUSAL in run_log(), "the refusal in the run's log", timeout_s=60)
    subprocess.run([FLWR, "stop", run_id, "radfl"], env=env, capture_output=True, timeout=60)


def test_coordinator_and_three_site_daemons_run_a_federation_over_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    port, mlflow_port = free_port(), free_port()
    superlink_local_port, mlflow_local_port = free_port(), free_port()
    # Coordinator: the federation folder, then each site's key, made at the site.
    _radfl(
        "coordinator", "init", "federation", "--host", PUBLIC, "--port", port,
        "--mlflow-port", mlflow_port, "--bind", PUBLIC,
        "--superlink-local-port", superlink_local_port,
        "--mlflow-local-port", mlflow_local_port, cwd=tmp_path,
    )  # fmt: skip
    assert (tmp_path / "federation").stat().st_mode & 0o777 == 0o700
    operator = _radfl("coordinator", "add-operator", "alice", "--dir", "federation", cwd=tmp_path)
    password = operator.stdout.split("password ", 1)[1].split()[0]
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
        assert (tmp_path / "federation/state").stat().st_mode & 0o777 == 0o700

        _play_the_outsider(tmp_path, port, [superlink_local_port, mlflow_local_port])
        _assert_mlflow_needs_a_password(mlflow_port, tmp_path / "federation/ca.crt")

        ca = "federation/ca.crt"
        address = f"{PUBLIC}:{port}"
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
                RADFL, "coordinator", "run", "--dir", "federation", "--rounds", "1",
                "--min-sites", "3", "--set", "image-size=32", "--set", "local-epochs=1",
                "--set", "batch-size=8", "--set", "min-cell-size=2",
            ],
            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
        assert "finished:completed" in done.stdout
        assert "[radfl] app bundle signed with key" in done.stdout
        site_log = (tmp_path / "hospitals/site-0/.radfl-logs/supernode.log").read_text()
        assert "accepted" in site_log and "app bundle sha256" in site_log, site_log[-2000:]

        # Metrics read back through the operators' route: TLS and alice's password.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tmp_path / ca))
        client = MlflowClient(f"https://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("radfl")
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        history = client.get_metric_history(run.info.run_id, "pooled/auc")
        # One round: every round is the same TLS/auth/signing path; each more round is two
        # more ClientApp processes per site (train, evaluate), about a minute here.
        assert sorted(m.step for m in history) == [0, 1]
        sites = {key.split("/")[1] for key in run.data.metrics if key.startswith("site/")}
        assert sites == {"site-0", "site-1", "site-2"}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
        assert "report/metrics.csv" in artifacts

        # Revoking an operator takes effect on the running coordinator at once.
        _radfl("coordinator", "remove-operator", "alice", "--dir", "federation", cwd=tmp_path)
        with httpx.Client(verify=str(tmp_path / ca), timeout=10.0) as http:
            revoked = http.get(
                f"https://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search",
                params={"max_results": 10},
                auth=("alice", password),
            )
        assert revoked.status_code == 401, revoked.text[:300]

        # Too few sites for a run: a clear error once the start deadline has passed. It
        # waits for its deadline while the sites refuse an unsigned app (a run of its own;
        # the ServerApp counts connected sites and sends them nothing).
        started = time.monotonic()
        short = processes.start(
            "short-run",
            [
                RADFL, "coordinator", "run", "--dir", "federation", "--rounds", "1",
                "--min-sites", "5", "--set", "start-timeout-s=10",
            ],
        )  # fmt: skip

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as waiter:
            short_s = waiter.submit(_seconds_to_exit, short, started)
            # After the MLflow checks: the refused run leaves an MLflow run of its own.
            _assert_sites_refuse_an_unsigned_app(tmp_path)
            seconds = short_s.result(timeout=300)
        short_output = processes.output("short-run")
        assert short.returncode == 1, short_output[-3000:]
        assert "3 site(s) connected after 10 s; the run needs 5 (min-sites)" in short_output
        assert "finished:failed" in short_output
        assert seconds < 120

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
