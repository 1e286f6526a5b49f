"""A private Flower SuperLink in simulation mode, started and stopped by PID.

``flwr run`` with the ``:local:`` connection starts a detached SuperLink on a fixed port that
outlives the command, and a stale one from another checkout silently serves the next run. RadFL
starts its own on a free loopback port, with its own ``FLWR_HOME``, and stops exactly that
process when the simulation ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from common.errors import RadFLError

CONNECTION_NAME = "radfl-local"


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (empty once ``root`` is gone)."""
    try:
        return [child.pid for child in psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalSuperLink:
    """Context manager: a ``flower-superlink --simulation`` bound to 127.0.0.1.

    Parameters
    ----------
    flwr_home : Path
        Folder used as ``FLWR_HOME``: the connection config, the SuperLink's state and log.
    env : dict
        Environment of the SuperLink (the ServerApp it runs inherits it, ``MLFLOW_TRACKING_URI``
        included).
    startup_timeout_s : float
        How long to wait for the SuperLink's health endpoint.
    """

    def __init__(self, flwr_home: Path, env: dict[str, str], startup_timeout_s: float = 60.0):
        self.flwr_home = flwr_home
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = flwr_home / "superlink.log"

    def __enter__(self) -> LocalSuperLink:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.flwr_home / "config.toml").write_text(
            "[superlink]\n"
            f'default = "{CONNECTION_NAME}"\n\n'
            f"[superlink.{CONNECTION_NAME}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            "insecure = true\n"
        )
        command = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.flwr_home / "state.db"),
            "--disable-runtime-dependency-installation",
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # Its PID (and process group): what to stop, or kill, from outside this process.
        (self.flwr_home / "superlink.pid").write_text(str(self.process.pid))
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RadFLError(
                    f"flower-superlink exited with code {self.process.returncode}; "
                    f"see {self.log_path}"
                )
            if self._healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise RadFLError(
            f"flower-superlink did not start within {self.startup_timeout_s:.0f} s; "
            f"see {self.log_path}"
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the SuperLink and the processes it started: its process group, and every
        process below it (the simulation runtime and Ray may start their own groups)."""
        if self.process is None or self.process.poll() is not None:
            return
        below = descendants(self.process.pid)
        pgid = os.getpgid(self.process.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.process.wait()
        # Make sure nothing it started is left.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success
        except httpx.HTTPError:
            return False
