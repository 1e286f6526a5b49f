"""The coordinator's services, ``radfl coordinator start``: the SuperLink, an MLflow server and
nginx in front of them (``server.proxy``), as child process groups, until SIGINT or SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.errors import RadFLError
from server import proxy
from server.federation import (
    LOOPBACK,
    LOOPBACK_NAMES,
    STARTUP_TIMEOUT_S,
    Federation,
    fleet_route_healthy,
    mlflow_healthy,
    register_sites,
    superlink_healthy,
    url_host,
)


class Services:
    """The SuperLink, the MLflow server and nginx of a federation, as child process groups."""

    def __init__(self, federation: Federation) -> None:
        self.federation = federation
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs = federation.state / "logs"
        #: Set from a signal handler: a start still waiting for health gives up at once.
        self.stopping = False

    def start(self) -> None:
        federation = self.federation
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        federation.write_connection()
        state = federation.state
        nginx = proxy.nginx_command(
            proxy.write_nginx_config(federation.routes(), federation.nginx_prefix),
            federation.nginx_prefix,
        )
        origins = {
            f"https://{url_host(host)}:{federation.mlflow_port}"
            for host in (*federation.hosts, *LOOPBACK_NAMES, federation.mlflow_bind)
            if host not in ("0.0.0.0", "::")
        }
        self._spawn(
            "mlflow",
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
                "--artifacts-destination", str(state / "mlartifacts"),
                "--host", LOOPBACK,
                "--port", str(federation.mlflow_local_port),
                "--workers", "1",
                # The UI is served through nginx's operators' route, under these origins.
                "--cors-allowed-origins", ",".join(sorted(origins)),
            ],
        )  # fmt: skip
        self._spawn(
            "superlink",
            [
                "flower-superlink",
                "--ssl-ca-certfile", str(federation.ca_cert),
                "--ssl-certfile", str(federation.server_cert),
                "--ssl-keyfile", str(federation.server_key),
                "--enable-supernode-auth",
                "--database", str(state / "superlink.db"),
                "--host", LOOPBACK,
                "--port", str(federation.superlink_local_port),
                "--isolation", "subprocess",
                "--disable-runtime-dependency-installation",
            ],
        )  # fmt: skip
        self._spawn("nginx", nginx)
        self._wait_until_healthy()
        register_sites(federation)
        (state / "services.json").write_text(
            json.dumps({name: p.pid for name, p in self.processes.items()})
        )

    def _spawn(self, name: str, command: list[str]) -> None:
        with (self.logs / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                command,
                env=self.federation.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        waiting = {
            "superlink": superlink_healthy,
            "mlflow": mlflow_healthy,
            "nginx": fleet_route_healthy,
        }
        while waiting and time.monotonic() < deadline:
            if self.stopping:
                self.stop()
                raise RadFLError("stopped while starting")
            self.check_alive()
            for name, healthy in list(waiting.items()):
                if healthy(self.federation):
                    del waiting[name]
            time.sleep(0.5)
        if waiting:
            self.stop()
            raise RadFLError(
                f"{', '.join(waiting)} did not answer within {STARTUP_TIMEOUT_S:.0f} s; see "
                f"{self.logs}"
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                self.stop()
                raise RadFLError(
                    f"{name} exited with code {process.returncode}; see {self.logs / name}.log"
                )

    def stop(self, timeout_s: float = 20.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # children of the group (ServerApps)
        with contextlib.suppress(FileNotFoundError):
            (self.federation.state / "services.json").unlink()


def start(root: Path) -> int:
    """Run the SuperLink, MLflow and nginx until SIGINT or SIGTERM; 1 if one of them dies."""
    federation = Federation.load(root)
    services = Services(federation)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = services.stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        services.start()
        print(
            f"[radfl] federation {federation.name}: sites dial {federation.address} (TLS, site "
            f"authentication, Fleet API only); operators: Control API at "
            f"{federation.local_address} (this machine), MLflow at "
            f"{federation.operators_mlflow_url} (password); "
            f"{len(federation.registered())} sites registered; logs in {services.logs}",
            flush=True,
        )
        while not stopping:
            services.check_alive()
            time.sleep(0.5)
        return 0
    except RadFLError as exc:
        print(f"radfl: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
