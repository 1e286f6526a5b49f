"""The ``radfl`` console script leaves without the interpreter's teardown, but only after what
a normal exit would still have done."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, sys, tempfile, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import common.cli as cli

out = Path(sys.argv[1])
kept = tempfile.TemporaryDirectory()  # its finalizer removes it at exit
(out / "tempdir").write_text(kept.name)

def late(name):
    time.sleep(0.5)
    (out / name).write_text("done")

def main():
    pool = ThreadPoolExecutor(1)
    pool.submit(late, "queued-upload")  # not waited for by main
    threading.Thread(target=late, args=("worker-thread",)).start()
    atexit.register(lambda: (out / "exit-hook").write_text("ran"))
    print("printed without a newline flush", end="")
    return 3

cli.main = main
cli.console()
raise SystemExit("console() returned")
"""


def test_the_console_exits_with_mains_code_after_pools_threads_and_exit_hooks(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stderr
    assert done.stdout == "printed without a newline flush"
    for name in ("queued-upload", "worker-thread", "exit-hook"):
        assert (tmp_path / name).exists(), name
    assert not Path((tmp_path / "tempdir").read_text()).exists()


def test_an_error_leaves_the_usual_way() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import common.cli as c; c.main = lambda: 1 / 0; c.console()"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "ZeroDivisionError" in done.stderr
