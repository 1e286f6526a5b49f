"""``radfl simulate``: the whole federation on one machine through Flower's simulation engine.

It runs the app in this repository (or ``--app-dir``) inside this process on Flower's simulation
runtime (``simulations.inprocess``), or with ``--superlink`` on a private SuperLink (see
``local_superlink``) through ``flwr run``, as a deployment does; shows progress as rounds finish,
and ends with a summary read back from the MLflow run, so every number printed can be found in
MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from common.config import (
    RUN_FINISHED_LOG,
    SIMULATION_DATA_ENV,
    ClientConfig,
    ServerConfig,
    default_run_config,
    format_run_config,
    from_run_config,
    load_toml_config,
    parse_overrides,
)
from common.errors import RadFLError
from simulations.inprocess import (
    BACKENDS,
    PROGRESS_MARKERS,
    choose_backend,
    interrupt_handler,
    ray_env,
    say_interrupted,
    where_sites_run,
)
from simulations.local_superlink import CONNECTION_NAME, LocalSuperLink

APP_DIR = Path(__file__).resolve().parent.parent
#: Fault injection (``simulations.faults``); the production ClientApp never reads it.
FAULTS_ENV = "RADFL_FAULTS"
PRODUCTION_CLIENTAPP = 'clientapp = "client.app:app"'
FAULTS_CLIENTAPP = 'clientapp = "simulations.faults:app"'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, default=3, help="number of simulated hospitals")
    parser.add_argument("--rounds", type=int, help="federated rounds (run config num-rounds)")
    parser.add_argument(
        "--task",
        help="classification, segmentation, detection or instance (run config task; default "
        "classification)",
    )
    parser.add_argument("--dims", type=int, choices=(2, 3), help="2D images or 3D volumes")
    parser.add_argument(
        "--model", help="model name, see `radfl models` (default: the task's own, e.g. unet)"
    )
    parser.add_argument("--strategy", help="aggregation strategy name")
    parser.add_argument("--seed", type=int, help="seed of data, model and training")
    parser.add_argument("--config", type=Path, help="TOML file of run-config overrides")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one run-config override, e.g. --set local-epochs=2 (repeatable)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".radfl"),
        help="folder for the simulation's Flower state and logs (default .radfl)",
    )
    parser.add_argument(
        "--in-memory",
        action="store_true",
        help="generate each synthetic site in memory instead of reading site folders on disk",
    )
    parser.add_argument(
        "--data",
        type=Path,
        help="folder of site folders site-0, site-1, ... (default: synthetic hospitals written "
        "once under WORKDIR/data)",
    )
    parser.add_argument(
        "--cpus-per-site", type=int, default=1, help="CPU cores each simulated site may use"
    )
    parser.add_argument(
        "--node-config",
        default="",
        metavar="'KEY=VALUE ...'",
        help="node config of every simulated site, as flower-supernode takes it, e.g. the "
        "site's disclosure policy: 'min-cell-size=20 max-evaluations=50' (client.disclosure)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Flower's full log")


def add_evaluation_arguments(parser: argparse.ArgumentParser) -> None:
    """Options only a federated simulation has."""
    parser.add_argument(
        "--gpus-per-site",
        type=float,
        default=0.0,
        help="GPUs each simulated site may use; a fraction shares one GPU, e.g. 0.25 runs four "
        "sites on each GPU (default 0: CPU only)",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="HOST:PORT",
        help="run the simulated sites on this running Ray cluster (its head's address, as "
        "`ray start --head` prints it) instead of a private Ray instance on this machine; "
        "--cpus-per-site/--gpus-per-site size each site on the cluster's nodes",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="run the sites in this process (local: the default, no Ray start) or in Ray actors "
        "(ray: the default with --ray-address, --gpus-per-site or a 'hang' fault)",
    )
    parser.add_argument(
        "--leave-out",
        action="append",
        default=[],
        metavar="SITE",
        help="train without this site and report on it as external validation, e.g. "
        "--leave-out site-2 (repeatable; run config leave-out)",
    )
    parser.add_argument(
        "--cross-site",
        action="store_true",
        help="also train a local-only model at each site and evaluate every model on every "
        "site (run config cross-site)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_KEY",
        help="continue the stopped or crashed run RUN_KEY from its last checkpoint (give the "
        "same other options as the first time)",
    )
    parser.add_argument(
        "--app-dir",
        type=Path,
        default=APP_DIR,
        help="Flower app directory to run (default: this repository's apps)",
    )
    parser.add_argument(
        "--faults",
        default=os.environ.get(FAULTS_ENV, ""),
        metavar="SPEC",
        help="simulation only: make sites misbehave, e.g. 'site-1:crash@1,site-2:nan' (runs the "
        f"ClientApp of simulations.faults; default ${FAULTS_ENV})",
    )
    parser.add_argument(
        "--superlink",
        action="store_true",
        help="run through a private SuperLink and `flwr run`, as a deployment runs (the app "
        "built, shipped and installed); slower to start than the default, which runs the "
        "federation inside this process",
    )


def run_config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The run-config values this invocation sets, validated against the app's schema."""
    overrides: dict[str, Any] = {}
    if args.config is not None:
        overrides.update(load_toml_config(args.config))
    overrides.update(parse_overrides(args.set))
    named = {
        "num-rounds": args.rounds,
        "task": args.task,
        "spatial-dims": args.dims,
        "model": args.model,
        "strategy": args.strategy,
        "seed": args.seed,
    }
    overrides.update({k: v for k, v in named.items() if v is not None})
    if args.task is not None and args.model is None and "model" not in overrides:
        from common.tasks import task_class

        overrides["model"] = task_class(args.task).default_model
    if getattr(args, "leave_out", None):
        overrides["leave-out"] = ",".join(args.leave_out)
    if getattr(args, "cross_site", False):
        overrides["cross-site"] = True
    overrides["min-sites"] = args.sites
    if getattr(args, "resume", None):
        overrides["run-key"] = args.resume
        overrides["resume"] = True
    overrides.setdefault("run-key", uuid.uuid4().hex)
    overrides.setdefault("checkpoint-dir", str(args.workdir.resolve() / "checkpoints"))
    # Validate now, not inside the simulation: a typo fails here, naming the key.
    from_run_config(ServerConfig, {**default_run_config(), **overrides})
    return overrides


# What a simulation needs only once it has finished (MLflow, torch, MONAI, plotting): imported
# while the federation starts up, not before the local SuperLink is started.
_AFTER_RUN_MODULES = ("simulations.summary", "simulations.overlays")


def _preload() -> None:
    for module in _AFTER_RUN_MODULES:
        importlib.import_module(module)


def simulate(args: argparse.Namespace) -> int:
    overrides = run_config_overrides(args)
    config = from_run_config(ServerConfig, {**default_run_config(), **overrides})
    names = [f"site-{i}" for i in range(args.sites)]
    unknown = [name for name in config.left_out_sites if name not in names]
    if unknown:
        raise RadFLError(f"--leave-out {', '.join(unknown)}: the sites are {', '.join(names)}")
    if len(set(config.left_out_sites)) >= args.sites:
        raise RadFLError("--leave-out would leave no site to train on")
    workdir = args.workdir.resolve()
    env = ray_env(simulation_env(workdir), getattr(args, "ray_address", None))
    data_root = federation_data(args, overrides)
    if data_root is not None:
        env[SIMULATION_DATA_ENV] = str(data_root)
    node_config = simulation_node_config(getattr(args, "node_config", ""))
    if node_config:
        from client.disclosure import SIMULATION_NODE_CONFIG_ENV

        env[SIMULATION_NODE_CONFIG_ENV] = json.dumps(node_config)
    args.backend = choose_backend(  # (--superlink runs its sites in Ray whatever the faults)
        getattr(args, "backend", None), env=env, gpus_per_site=getattr(args, "gpus_per_site", 0.0),
        faults="" if getattr(args, "superlink", False) else getattr(args, "faults", ""),
    )  # fmt: skip
    print(
        f"RadFL simulation: {args.sites} sites, {config.num_rounds} rounds, {config.model}, "
        f"{config.strategy}, seed {config.seed}; data {data_root or 'in memory'}; "
        f"{where_sites_run('ray' if getattr(args, 'superlink', False) else args.backend, env)}; "
        f"tracking to {env['MLFLOW_TRACKING_URI']}; run key {config.run_key} (--resume "
        f"{config.run_key} continues it from its last checkpoint)",
        flush=True,
    )
    started = time.monotonic()
    # SIGTERM (a scheduler, `kill`) stops the run like Ctrl-C: Ray or the SuperLink and
    # everything they started are stopped on the way out instead of being left running.
    in_process = not getattr(args, "superlink", False)
    handler = interrupt_handler(in_process=in_process, run_key=config.run_key)
    previous = signal.signal(signal.SIGTERM, handler)
    previous_sigint = signal.signal(signal.SIGINT, handler)
    try:
        if in_process:
            _run_here(args, overrides, env)
        else:
            _run_on_local_superlink(args, overrides, env, workdir)
    except KeyboardInterrupt:
        say_interrupted(config.run_key)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_sigint)
    wall_time_s = time.monotonic() - started
    from server import tracking
    from simulations.overlays import log_overlays
    from simulations.summary import print_summary

    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    run = tracking.find_run(config.run_key, config.experiment_name)
    if run is not None and run.info.status == "FINISHED":
        client_config = from_run_config(ClientConfig, {**default_run_config(), **overrides})
        # Only because every site is synthetic and local: a real site's images never move.
        log_overlays(run.info.run_id, config, client_config, args.sites, data_root)
    return print_summary(config, wall_time_s=wall_time_s)


def _run_here(args: argparse.Namespace, overrides: Mapping[str, Any], env: dict[str, str]) -> None:
    """The federation in this process (``simulations.inprocess``); a failure of the run is
    printed, and the summary below says the run did not finish."""
    from simulations.inprocess import run_in_process

    faults = getattr(args, "faults", "")
    if faults:
        env = {**env, FAULTS_ENV: faults}
    else:
        env = {k: v for k, v in env.items() if k != FAULTS_ENV}
    federation_config(args)  # checks the per-site resources, naming the option
    try:
        run_in_process(
            app_dir=args.app_dir.resolve(),
            overrides=overrides,
            env=env,
            num_sites=args.sites,
            cpus_per_site=args.cpus_per_site,
            gpus_per_site=getattr(args, "gpus_per_site", 0.0),
            faults=faults,
            verbose=args.verbose,
            backend=args.backend,
        )
    except RadFLError:
        raise  # a bad option (a fault spec): refused by name, as before the run
    except Exception as error:  # noqa: BLE001 - reported here; the summary says it failed
        print(f"radfl: the simulation failed: {error!r}", file=sys.stderr, flush=True)


def _run_on_local_superlink(
    args: argparse.Namespace, overrides: Mapping[str, Any], env: dict[str, str], workdir: Path
) -> int:
    """Submit the app to a private SuperLink and stream its log; ``flwr run``'s exit code."""
    app_dir = args.app_dir.resolve()
    faults = getattr(args, "faults", "")
    if faults:
        from simulations.faults import parse_faults

        parse_faults(faults)  # a typo fails here, naming the item
        app_dir = fault_app_dir(app_dir, workdir)
        env = {**env, FAULTS_ENV: faults}
    else:
        env = {k: v for k, v in env.items() if k != FAULTS_ENV}
    with LocalSuperLink(workdir / "flwr-home", env) as superlink:
        command = [
            "flwr",
            "run",
            str(app_dir),
            CONNECTION_NAME,
            "--stream",
            "--run-config",
            format_run_config(overrides),
            "--federation-config",
            federation_config(args),
        ]
        # Once the ServerApp says its MLflow run has ended, the SuperLink is stopped with the
        # simulation runtime and Ray below it, instead of waiting seconds for their shutdown.
        returncode = _stream(
            command, env, verbose=args.verbose, until=RUN_FINISHED_LOG, meanwhile=_preload
        )
        if returncode != 0:
            print(f"flwr run exited with {returncode}; SuperLink log: {superlink.log_path}")
    return returncode


def fault_app_dir(app_dir: Path, workdir: Path) -> Path:
    """A Flower app directory like ``app_dir`` whose ClientApp is ``simulations.faults:app``.

    Only its ``pyproject.toml`` differs; the code is imported from this installation, as
    for any app directory without the packages inside.
    """
    pyproject = (app_dir / "pyproject.toml").read_text()
    if PRODUCTION_CLIENTAPP not in pyproject:
        raise RadFLError(
            f"--faults needs {app_dir / 'pyproject.toml'} to name the ClientApp "
            f"{PRODUCTION_CLIENTAPP!r}, which it wraps"
        )
    folder = workdir / "fault-app"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(
        pyproject.replace(PRODUCTION_CLIENTAPP, FAULTS_CLIENTAPP)
    )
    return folder


def federation_data(args: argparse.Namespace, overrides: Mapping[str, Any]) -> Path | None:
    """The folder holding ``site-0 .. site-(N-1)``: ``--data``, or synthetic hospitals on disk.

    Synthetic hospitals are written once per set of generation parameters under
    ``WORKDIR/data`` and reused by later runs. ``None`` with ``--in-memory``.
    """
    if args.in_memory:
        return None
    if args.data is not None:
        root = args.data.resolve()
        missing = [i for i in range(args.sites) if not (root / f"site-{i}").is_dir()]
        if missing:
            raise RadFLError(
                f"--data {root} lacks site folders site-{missing[0]} (of {args.sites})"
            )
        return root
    from simulations.synth import FederationSpec, ensure_federation

    config = from_run_config(ClientConfig, {**default_run_config(), **overrides})
    folders = ensure_federation(
        args.workdir.resolve() / "data",
        FederationSpec(
            sites=args.sites,
            task=config.task,
            dims=config.spatial_dims,
            seed=config.seed,
            samples_per_site=config.synthetic_samples_per_site,
            image_size=config.image_size,
            num_classes=config.num_classes,
            shortcut_site=config.synthetic_shortcut_site,
        ),
    )
    return folders[0].parent


def simulation_node_config(text: str) -> dict[str, Any]:
    """``--node-config`` as a dict, checked: Flower's simulation gives virtual sites no node
    config of their own, so it travels in ``RADFL_SIMULATION_NODE_CONFIG``."""
    from client.disclosure import DisclosurePolicy, parse_node_config

    values = parse_node_config(text) if text.strip() else {}
    DisclosurePolicy.from_node_config(values)  # a bad policy fails here, naming its key
    return values


def federation_config(args: argparse.Namespace) -> str:
    """``flwr run --federation-config``: the number of simulated sites and each one's share of
    the Ray cluster (Flower's ``client-resources-*``)."""
    gpus = getattr(args, "gpus_per_site", 0.0)
    if args.cpus_per_site < 1:
        raise RadFLError(f"--cpus-per-site {args.cpus_per_site}: a site needs at least one CPU")
    if gpus < 0:
        raise RadFLError(f"--gpus-per-site {gpus}: must be 0 or more")
    return (
        f"num-supernodes={args.sites} client-resources-num-cpus={args.cpus_per_site} "
        f"client-resources-num-gpus={gpus}"
    )


def simulation_env(workdir: Path) -> dict[str, str]:
    env = os.environ.copy()
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}")
    env["FLWR_HOME"] = str(workdir / "flwr-home")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Flower would otherwise build a fresh environment per run and resolve a CUDA torch into it.
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    return env


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LOG_PREFIX = re.compile(r"^(?:(?:DEBUG|INFO|WARNING|ERROR)\s*:(?:flwr:)?\s*)")


def _stream(
    command: list[str],
    env: dict[str, str],
    *,
    verbose: bool,
    until: str | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> int:
    """Run ``command``, echoing progress lines (all lines with ``verbose``); if a line holds
    ``until``, stop the command there and return 0. ``meanwhile`` is called once the command
    has started (its output waits in the pipe)."""
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=APP_DIR,
    )
    assert process.stdout is not None  # guaranteed by stdout=PIPE
    if meanwhile is not None:
        meanwhile()
    seen: set[str] = set()
    for line in process.stdout:
        text = line.rstrip()
        message = _LOG_PREFIX.sub("", _ANSI.sub("", text)).rstrip()
        if verbose:
            print(text, flush=True)
        elif any(marker in text for marker in PROGRESS_MARKERS) and message not in seen:
            # Flower logs each line through two handlers; show each message once.
            seen.add(message)
            print(message, flush=True)
        if until is not None and until in message:
            process.terminate()
            process.wait()
            return 0
    return process.wait()
