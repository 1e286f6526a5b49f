"""The federation of ``radfl simulate`` run inside this process by Flower's simulation runtime.

What ``flwr run`` against a SuperLink does in three processes (the SuperLink, ``flwr-simulation``
and the CLI streaming the log), with an app bundle built, shipped and installed for every run,
is done here in one: the ServerApp runs in a thread, the virtual sites in this process too
(``simulations.local_backend``, the default) or in Ray actors (``--backend ray``), messages
pass through Flower's in-memory link state. The profile of issue 22 (``radfl bench --parts
startup``) put about 9 s of a 30 s one-round run on the SuperLink, the bundle and the log stream.

The ServerApp and ClientApp are the ones ``flwr run`` would load (the app folder's
``[tool.flwr.app.components]``) and their run config is fused from the app folder's
``pyproject.toml`` and the overrides exactly as Flower's own simulation process fuses it
(``flwr.simulation.app``), through the same function, ``_run_simulation`` (Ray), or the same
pieces of it (local). That function is Flower's internal one (the public ``run_simulation``
takes no run config): its use is checked by ``tests/simulations/test_inprocess.py`` against
the installed Flower.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import format_run_config
from common.errors import RadFLError

#: Lines ``radfl simulate`` shows without ``--verbose``: RadFL's progress, Flower's round
#: headers, errors and the boxed messages the Flower CLI prints.
PROGRESS_MARKERS = ("[radfl]", "[ROUND", "ERROR", "Error", "Traceback", "Exception", "│", "╰")
#: ClientApp of fault injection (``simulations.faults``), in place of the app folder's own.
FAULTS_CLIENT_APP = "simulations.faults:app"
#: ``RAY_ADDRESS`` for a Ray instance of the run's own (``ray_env``).
LOCAL_RAY = "local"
#: The backends that run the sites: in this process (``simulations.local_backend``), or in Ray
#: actors (Flower's own; a Ray cluster, GPUs, and a site that hangs need it).
BACKENDS = ("local", "ray")


class ProgressFilter(logging.Filter):
    """Only the log records ``radfl simulate`` shows without ``--verbose``: RadFL's progress,
    Flower's round headers and errors (``PROGRESS_MARKERS``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return record.levelno >= logging.ERROR or any(m in message for m in PROGRESS_MARKERS)


def app_components(app_dir: Path) -> tuple[str, str]:
    """``(serverapp, clientapp)`` references of the Flower app in ``app_dir``."""
    from flwr.common.config import get_project_config

    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    return str(components["serverapp"]), str(components["clientapp"])


def backend_config(*, cpus_per_site: int, gpus_per_site: float, verbose: bool) -> dict[str, Any]:
    """Flower's Ray backend config: each virtual site's share, and a Ray started with only what
    a simulation needs (no dashboard; the sites' output on this terminal only with
    ``verbose``)."""
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "WARNING",
    }
    return {
        "client_resources": {"num_cpus": cpus_per_site, "num_gpus": gpus_per_site},
        "init_args": init_args,
    }


def ray_env(env: dict[str, str], address: str | None) -> dict[str, str]:
    """``env`` with ``RAY_ADDRESS`` set: Flower's Ray backend calls ``ray.init()`` without an
    address, which attaches to the cluster ``RAY_ADDRESS`` names instead of starting a Ray
    instance of its own.

    ``address`` (``--ray-address``) first, then a ``RAY_ADDRESS`` the user set, else ``local``,
    a Ray of this run's own: unset, ``ray.init()`` would attach to whichever cluster ``ray
    start`` last started on this machine (``/tmp/ray/ray_current_cluster``), another user's or
    a test's, and fail when that one stops."""
    if not address:
        return {**env, "RAY_ADDRESS": env.get("RAY_ADDRESS") or LOCAL_RAY}
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise RadFLError(f"--ray-address {address!r}: expected HOST:PORT of the Ray head")
    return {**env, "RAY_ADDRESS": address}


def ray_cluster(env: Mapping[str, str]) -> str | None:
    """The Ray cluster ``env`` attaches the sites to, or None for a Ray of the run's own."""
    address = env.get("RAY_ADDRESS")
    return address if address and address != LOCAL_RAY else None


def choose_backend(
    requested: str | None, *, env: Mapping[str, str], gpus_per_site: float, faults: str
) -> str:
    """The backend that runs the sites: ``requested``, or ``local`` unless the run needs Ray
    (a Ray cluster, GPUs per site, or a fault that hangs a site: the one in-process worker
    would hang with it, where Ray's other actors serve the other sites and the hung one is
    killed at the end). A request the run cannot honour is refused, naming the option."""
    needs_ray = [
        reason
        for reason, needed in (
            ("--ray-address (a Ray cluster)", ray_cluster(env) is not None),
            ("--gpus-per-site (GPUs are Ray resources)", gpus_per_site > 0),
            ("a 'hang' fault (--faults)", ":hang" in faults),
        )
        if needed
    ]
    if requested is not None and requested not in BACKENDS:
        raise RadFLError(f"--backend {requested!r}: expected one of {', '.join(BACKENDS)}")
    if requested == "local" and needs_ray:
        raise RadFLError(f"--backend local: {needs_ray[0]} needs --backend ray")
    return requested or ("ray" if needs_ray else "local")


def where_sites_run(backend: str, env: Mapping[str, str]) -> str:
    """Where ``backend`` runs the sites, as ``radfl simulate`` announces it."""
    cluster = ray_cluster(env)
    if cluster is not None:
        return f"sites on Ray cluster {cluster}"
    return "sites in this process" if backend == "local" else "sites in a private Ray"


def run_in_process(
    *,
    app_dir: Path,
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
    num_sites: int,
    cpus_per_site: int,
    gpus_per_site: float,
    faults: str,
    verbose: bool,
    backend: str = "local",
) -> None:
    """Run the app in ``app_dir`` on ``num_sites`` virtual sites until its ServerApp returns.

    ``env`` becomes this process's environment first: the ServerApp thread reads it, and so do
    the sites, in this process (``backend`` ``local``) or in the workers of the Ray instance
    started here (``ray``; ``RAY_ADDRESS`` in ``env`` attaches to a running cluster instead).
    Raises what the ServerApp raised.
    """
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir, parse_config_args
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    os.environ.clear()
    os.environ.update(env)
    server_app, client_app = app_components(app_dir)
    if faults:
        # Imported only now: its ClientApp reads the faults from the environment when the
        # module is imported, and this process ships that very object to the sites' workers.
        from simulations.faults import parse_faults

        parse_faults(faults)  # a typo fails here, naming the item
        client_app = FAULTS_CLIENT_APP
    # As `flwr run --run-config` parses it, so that a value means the same either way.
    override_config = parse_config_args([format_run_config(overrides)])
    run = Run.create_empty(run_id=_run_id())
    run.override_config = override_config
    run.primary_task_id = _task_id()
    run.federation_id = NOOP_FEDERATION_ID
    # Who the ServerApp's messages come from (flwr.simulation.app sets it from its task).
    TaskIdentity.task_id = run.primary_task_id
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(app_dir, override_config),
    )
    _quiet(verbose)
    if backend == "local":
        from simulations.local_backend import run_federation

        run_federation(
            num_sites=num_sites,
            cpus_per_site=cpus_per_site,
            server_app_attr=server_app,
            client_app_attr=client_app,
            server_context=context,
            app_dir=str(app_dir),
            run=run,
        )
        return
    ray_config = backend_config(
        cpus_per_site=cpus_per_site, gpus_per_site=gpus_per_site, verbose=verbose
    )
    start_ray(ray_config["init_args"], app_dir)
    _run_simulation(
        num_supernodes=num_sites,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        server_app_attr=server_app,
        client_app_attr=client_app,
        backend_name="ray",
        backend_config=ray_config,  # type: ignore[arg-type]
        server_app_context=context,
        app_dir=str(app_dir),
        run=run,
        is_app=True,
        verbose_logging=False,
    )


def start_ray(init_args: Mapping[str, Any], app_dir: Path) -> None:
    """Start (or attach to) Ray as Flower's Ray backend would, which then finds it running.

    Started here so that this process keeps its own SIGTERM handler: ``ray.init`` replaces it
    with one that exits at once (and Ray's crash handler aborts with a stack dump), which
    would skip ``radfl simulate``'s stopping of the run. The sites' workers import the apps by
    ``PYTHONPATH``: this process's ``sys.path`` with the app folder on it, as Flower's backend
    passes it (``RayBackend.init_ray``).
    """
    import ray

    if ray.is_initialized():
        return
    if str(app_dir) not in sys.path:
        sys.path.insert(0, str(app_dir))
    pythonpath = os.pathsep.join(sys.path)
    saved = os.environ.get("PYTHONPATH")
    if saved:
        pythonpath = f"{pythonpath}{os.pathsep}{saved}"
    handler = signal.getsignal(signal.SIGTERM)
    # Ray's processes start with this environment; it is put back afterwards, or every later
    # child of this process (a test's, a tuning search's) would import from this run's path,
    # including folders gone since (an MLflow model's code, a test's temp folder).
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    if handler is not None:  # None: not set from Python, nothing to put back
        signal.signal(signal.SIGTERM, handler)


def stop_ray() -> None:
    """Stop the Ray instance this process started (or leave the cluster it attached to)."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def _run_id() -> int:
    from flwr.common.constant import RUN_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

    return int(generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))


def _task_id() -> int:
    from flwr.common.constant import TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes

    return int(generate_rand_int_from_bytes(TASK_ID_NUM_BYTES))


def _quiet(verbose: bool) -> None:
    """Without ``verbose``, Flower's log shows only progress, and the warnings of libraries
    (MLflow's store, pandas, torch.export) go to the logging system unshown, as they went to
    the SuperLink's log before."""
    # Flower's own handler prints its records; a root handler a library adds (logging's
    # basicConfig) would print them twice.
    logging.getLogger("flwr").propagate = False
    if verbose:
        return
    logging.getLogger("flwr").addFilter(ProgressFilter())
    logging.captureWarnings(True)
    captured = logging.getLogger("py.warnings")
    captured.addHandler(logging.NullHandler())
    captured.propagate = False
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def abandon() -> None:
    """Leave at once after an interrupt, from its signal handler: the Ray processes this one
    started are killed, and the ServerApp's thread, which would wait out its round's timeout
    for sites that are gone, is not waited for. Not ``ray.shutdown()``: Flower's threads still
    call into Ray, and a call after the shutdown makes Ray's core worker end the process with
    exit code 1 ("The core worker has already been shutdown") before this one could exit with
    130. Killed Ray processes make the core worker do the same once it notices, so nothing
    waits between the kills and the exit; a SIGKILL cannot be refused, and the killed
    processes are reaped by init after this one exits."""
    import psutil

    sys.stdout.flush()
    sys.stderr.flush()
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)


def interrupt_handler(*, in_process: bool, run_key: str) -> Callable[[int, object], None]:
    """The handler of SIGTERM and Ctrl-C during ``radfl simulate``. A run in this process
    leaves from the handler, at once (``abandon``): an exception unwinding through Flower's
    simulation runtime reaches its ``finally``, which shuts Ray down while Flower's worker
    threads still call into it, and Ray's core worker then ends the process with exit code 1
    before it could say it was interrupted (CI, 2026-11-30, twice). A run on the SuperLink
    unwinds (``KeyboardInterrupt``), which stops the SuperLink and its processes."""

    def interrupt(signum: int, frame: object) -> None:
        # From here on, Flower's message threads in this process would report each site's
        # actor, stopped on the way out, as an error of the run: it is not one.
        logging.getLogger("flwr").disabled = True
        if in_process:
            say_interrupted(run_key)
            abandon()
        raise KeyboardInterrupt(f"signal {signum}")

    return interrupt


def say_interrupted(run_key: str) -> None:
    print(
        "\nradfl: interrupted; the simulation and its processes were stopped. "
        f"`--resume {run_key}` with the same options continues from the last checkpoint.",
        file=sys.stderr,
        flush=True,
    )
