"""The process-tree walk the SuperLink's stop relies on (psutil)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from simulations.local_superlink import descendants


def test_descendants_finds_grandchildren_and_nothing_once_the_root_is_gone():
    # A child that starts its own child: both must be found from the root.
    script = "import subprocess, time; subprocess.Popen(['sleep', '30']); time.sleep(30)"
    root = subprocess.Popen([sys.executable, "-c", script])
    try:
        found: list[int] = []
        deadline = time.monotonic() + 10
        while len(found) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
            found = descendants(root.pid)
        assert len(found) == 1  # the grandchild `sleep`
        assert found[0] != root.pid
    finally:
        for pid in descendants(root.pid):
            os.kill(pid, signal.SIGKILL)
        root.kill()
        root.wait()
    assert descendants(root.pid) == []
