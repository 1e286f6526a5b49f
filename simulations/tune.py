"""``radfl tune``: a hyper-parameter search over simulated federations with Optuna.

Each trial is one ``radfl simulate`` (its function, with the trial's values as ``--set``
overrides), so every check and report a simulation has, a trial has too. Its MLflow run, which
the ServerApp creates, becomes a child of the search's parent run (MLflow's
``mlflow.parentRunId`` tag, set as soon as the run appears). The objective is the pooled
*validation* value of the task's primary metric (AUC for classification) of the model the run
delivers: the best round's under ``final-model = best``, else the last round's. The test split
is never read: its numbers stay an unbiased estimate for the chosen configuration.

While a trial runs, its per-round pooled validation metric is read from MLflow as rounds finish
and reported to Optuna's pruner (median rule); a trial the pruner stops is interrupted as Ctrl-C
would stop ``radfl simulate``, and recorded as pruned. At the end the best configuration is
written as a TOML file that ``radfl simulate --config FILE`` takes, and a trials table (CSV) and
a plot of the objective per trial are logged to the parent run.

Akiba et al., "Optuna: A Next-generation Hyperparameter Optimization Framework", KDD 2019.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

import optuna
import psutil
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common.config import (
    ServerConfig,
    default_run_config,
    from_run_config,
    load_toml_config,
    parse_overrides,
)
from common.errors import ConfigError, RadFLError
from common.tasks import task_class
from server import tracking
from simulations import simulate as simulation
from simulations.tune_space import DEFAULT_SPACE, Parameter, parse_ranges, searched

#: MLflow's own tag for nesting: the UI shows a run under the run it names.
PARENT_RUN_TAG = "mlflow.parentRunId"
TRIAL_TAG = "radfl.tune.trial"
STATE_TAG = "radfl.tune.state"
TUNE_MODE = "tune"
#: Run-config keys each simulation sets for itself; the best configuration leaves them out.
PER_RUN_KEYS = ("run-key", "checkpoint-dir", "min-sites", "resume")
#: ``radfl simulate``'s exit code when interrupted.
INTERRUPTED = 130

SimulateFunction = Callable[[argparse.Namespace], int]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    simulation.add_arguments(parser)
    parser.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    parser.add_argument(
        "--range",
        action="append",
        default=[],
        metavar="KEY=LOW:HIGH",
        help="search KEY over LOW..HIGH instead of its default range, e.g. "
        "--range learning-rate=1e-5:1e-3 or --range batch-size=8,16 (repeatable; defaults: "
        + "; ".join(p.describe() for p in DEFAULT_SPACE)
        + ")",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("tuned.toml"),
        help="where to write the best configuration, for `radfl simulate --config` "
        "(default tuned.toml)",
    )
    parser.add_argument(
        "--prune-after-trials",
        type=int,
        default=3,
        help="trials that run to the end before any is pruned (median rule; default 3)",
    )
    parser.add_argument(
        "--poll-s",
        type=float,
        default=2.0,
        help="how often a trial's round metrics are read from MLflow (seconds, default 2)",
    )


def tune(args: argparse.Namespace) -> int:
    """``radfl tune``: run the study; 0 when some trial completed."""
    if args.trials < 1:
        raise ConfigError(f"--trials {args.trials}: at least one trial")
    if args.prune_after_trials < 0:
        raise ConfigError(f"--prune-after-trials {args.prune_after_trials}: 0 or more")
    if args.poll_s <= 0:
        raise ConfigError(f"--poll-s {args.poll_s}: must be above 0")
    space = parse_ranges(args.range)
    study = Study.prepare(args, space)
    return study.run()


@dataclass
class Study:
    """One search: its base simulation options, what it draws, its parent MLflow run."""

    args: argparse.Namespace
    base: dict[str, Any]
    config: ServerConfig
    space: tuple[Parameter, ...]
    metric: str
    higher_is_better: bool
    client: MlflowClient
    parent_run_id: str = ""
    simulate: SimulateFunction = simulation.simulate
    console: IO[str] = field(default_factory=lambda: sys.stdout)

    @classmethod
    def prepare(
        cls,
        args: argparse.Namespace,
        space: tuple[Parameter, ...] = DEFAULT_SPACE,
        simulate: SimulateFunction = simulation.simulate,
    ) -> Study:
        """Check the base options and the space before any trial runs; a bad key fails here."""
        base = simulation.run_config_overrides(args)
        config = from_run_config(ServerConfig, {**default_run_config(), **base})
        fixed = set(load_toml_config(args.config)) if args.config else set()
        fixed |= set(parse_overrides(args.set))
        drawn, left = searched(space, strategy=config.strategy, fixed=fixed)
        if not drawn:
            raise ConfigError(
                "nothing to search: " + "; ".join(f"{k}: {why}" for k, why in left.items())
            )
        task = task_class(config.task)
        info = task.metrics[task.primary_metric]
        uri = tracking.tracking_uri()
        # The trials' ServerApps and this process must write to one store.
        os.environ["MLFLOW_TRACKING_URI"] = uri
        study = cls(
            args=args,
            base={k: v for k, v in base.items() if k not in PER_RUN_KEYS},
            config=config,
            space=drawn,
            metric=f"pooled/{info.name}",
            higher_is_better=info.higher_is_better,
            client=MlflowClient(uri),
            simulate=simulate,
        )
        for key, why in left.items():
            study.say(f"not searched: {key} ({why})")
        return study

    def say(self, text: str) -> None:
        print(f"[tune] {text}", file=self.console, flush=True)

    def run(self) -> int:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            direction="maximize" if self.higher_is_better else "minimize",
            sampler=optuna.samplers.TPESampler(seed=self.config.seed),
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=self.args.prune_after_trials, n_warmup_steps=1
            ),
        )
        return self.optimize(study)

    def optimize(self, study: optuna.Study) -> int:
        """Run the trials of ``study`` under a new parent run; write and log the results."""
        experiment_id = tracking.ensure_experiment(self.config.experiment_name)
        parent = self.client.create_run(
            experiment_id,
            run_name=f"tune-{self.config.task}-{self.config.model}",
            tags={tracking.MODE_TAG: TUNE_MODE},
        )
        self.parent_run_id = parent.info.run_id
        self.client.log_batch(
            self.parent_run_id,
            params=[
                *_params(
                    {
                        "trials": self.args.trials,
                        "objective": f"{self.metric} (validation)",
                        "direction": study.direction.name.lower(),
                        "sites": self.args.sites,
                        **{f"space.{p.key}": p.describe() for p in self.space},
                        **{f"base.{k}": v for k, v in self.base.items()},
                    }
                )
            ],
        )
        self.say(
            f"{self.args.trials} trials of {self.args.sites}-site {self.config.strategy} "
            f"simulations; objective: {self.metric} on validation "
            f"({'higher' if self.higher_is_better else 'lower'} is better); searching "
            + ", ".join(p.describe() for p in self.space)
            + f"; parent MLflow run {self.parent_run_id}"
        )
        status = "FINISHED"
        try:
            with _interruptible() as interrupts:
                study.optimize(
                    lambda trial: self.trial(trial, interrupts),
                    n_trials=self.args.trials,
                    catch=(TrialFailedError,),
                )
        except KeyboardInterrupt:
            status = "KILLED"
            self.say("interrupted; results of the trials so far follow")
        except BaseException:
            self.client.set_terminated(self.parent_run_id, "FAILED")
            raise
        from simulations.tune_report import publish

        try:
            published = publish(self, study)
        finally:
            self.client.set_terminated(self.parent_run_id, status)
        return 0 if published and status == "FINISHED" else 1

    def trial(self, trial: optuna.Trial, interrupts: Interrupts) -> float:
        """One simulation with the trial's values; its objective, or pruned, or failed."""
        values = {p.key: p.suggest(trial) for p in self.space}
        run_key = uuid.uuid4().hex
        trial.set_user_attr("run_key", run_key)
        number = trial.number + 1
        self.say(
            f"trial {number}/{self.args.trials}: "
            + ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        )
        args = self.trial_args(values, run_key)
        log_path = args.workdir.resolve() / "tune" / f"trial-{number}.log"
        watcher = RoundWatcher(self, trial, run_key, interrupts)
        started = time.monotonic()
        code = self.simulate_watched(args, watcher, interrupts, log_path)
        watcher.poll()  # the rounds logged since the last poll, and the run's tags
        run_id = watcher.run_id
        trial.set_user_attr("mlflow_run_id", run_id or "")
        trial.set_user_attr("log", str(log_path))
        elapsed = f"{time.monotonic() - started:.0f} s"
        if watcher.pruned_at is not None:
            self._finish_child(run_id, "PRUNED", log_path, terminate=True)
            self.say(
                f"trial {number}: pruned after round {watcher.pruned_at} "
                f"({self.metric} {watcher.reported[watcher.pruned_at]:.4f}), {elapsed}"
            )
            trial.set_user_attr("pruned_at_round", watcher.pruned_at)
            raise optuna.TrialPruned(f"pruned after round {watcher.pruned_at}")
        if code == INTERRUPTED:
            self._finish_child(run_id, "INTERRUPTED", log_path, terminate=True)
            raise KeyboardInterrupt
        value = self.objective(run_id) if code == 0 and run_id else math.nan
        if not math.isfinite(value):
            self._finish_child(run_id, "FAIL", log_path, terminate=False)
            self.say(f"trial {number}: failed (radfl simulate exit {code}); its output: {log_path}")
            raise TrialFailedError(f"trial {number}: exit {code}, see {log_path}")
        self._finish_child(run_id, "COMPLETE", log_path, terminate=False)
        best = _best_value(trial.study, value, self.higher_is_better)
        self.say(f"trial {number}: {self.metric} {value:.4f} (best so far {best:.4f}), {elapsed}")
        return value

    def trial_args(self, values: dict[str, Any], run_key: str) -> argparse.Namespace:
        """``radfl simulate``'s arguments for one trial: this command's, plus the trial's
        values and run key as ``--set``, plus simulate's own defaults for the rest."""
        parser = argparse.ArgumentParser()
        simulation.add_arguments(parser)
        simulation.add_evaluation_arguments(parser)
        defaults = vars(parser.parse_args([]))
        own = {k: v for k, v in vars(self.args).items() if k in defaults}
        sets = [*self.args.set, *(f"{k}={v!r}" for k, v in values.items()), f"run-key={run_key}"]
        # On the SuperLink: a pruned trial is stopped by an interrupt, after which simulate
        # returns 130 there, whereas the in-process federation leaves the process at once.
        return argparse.Namespace(
            **{**defaults, **own, "set": sets, "faults": "", "superlink": True}
        )

    def simulate_watched(
        self,
        args: argparse.Namespace,
        watcher: RoundWatcher,
        interrupts: Interrupts,
        log_path: Path,
    ) -> int:
        """Run the simulation (its output to ``log_path`` unless ``--verbose``) while
        ``watcher`` reads its rounds; ``radfl simulate``'s exit code."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        interrupts.pruning = False
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            with log_path.open("w") as log, _redirected(log, keep=self.args.verbose):
                interrupts.in_flight = True
                watcher.start()
                try:
                    code = self.simulate(args)
                    interrupts.in_flight = False
                except KeyboardInterrupt:
                    interrupts.in_flight = False
                    if not interrupts.pruning:
                        raise
                    # The pruner's interrupt reached the end of the run, past simulate's handler.
                    code = INTERRUPTED
                finally:
                    interrupts.in_flight = False
                    watcher.stop()
        finally:
            _stop_new_children(before)
        return code

    def objective(self, run_id: str) -> float:
        """The pooled validation metric of the model the run delivers: its best round's
        (``final-model = best``) or its last round's."""
        history = self.client.get_metric_history(run_id, self.metric)
        values = [(m.step, m.value) for m in history if m.step > 0 and math.isfinite(m.value)]
        if not values:
            return math.nan
        if self.config.final_model == "last":
            return max(values)[1]
        pick = max if self.higher_is_better else min
        return pick(value for _, value in values)

    def _finish_child(
        self, run_id: str | None, state: str, log_path: Path, *, terminate: bool
    ) -> None:
        if not run_id:
            return
        self.client.set_tag(run_id, STATE_TAG, state)
        if log_path.exists():
            self.client.log_artifact(run_id, str(log_path), artifact_path="tune")
        if terminate and self.client.get_run(run_id).info.status == "RUNNING":
            # Its ServerApp was stopped mid-run and could not end the run itself (a stop that
            # reached it after its last round leaves the run as the ServerApp ended it).
            self.client.set_terminated(run_id, "KILLED")


class TrialFailedError(RadFLError):
    """A trial's simulation did not complete; the study records it and goes on."""


class RoundWatcher:
    """Reads a trial's rounds from MLflow while it runs: links its run to the parent, reports
    each round's pooled validation metric to Optuna and interrupts the simulation when the
    pruner says so."""

    def __init__(self, study: Study, trial: optuna.Trial, run_key: str, interrupts: Interrupts):
        self.study = study
        self.trial = trial
        self.run_key = run_key
        self.interrupts = interrupts
        self.run_id: str | None = None
        self.reported: dict[int, float] = {}
        self.pruned_at: int | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tune-round-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stopped.wait(self.study.args.poll_s):
            try:
                self.poll(may_prune=True)
            except MlflowException:
                # The store can be busy with the ServerApp's own writes; read again next time.
                continue
            if self.pruned_at is not None:
                return

    def poll(self, *, may_prune: bool = False) -> None:
        """Read the run's new rounds; with ``may_prune``, ask the pruner after each."""
        client = self.study.client
        if self.run_id is None:
            run = tracking.find_run(self.run_key, self.study.config.experiment_name)
            if run is None:
                return
            self.run_id = run.info.run_id
            client.set_tag(self.run_id, PARENT_RUN_TAG, self.study.parent_run_id)
            client.set_tag(self.run_id, TRIAL_TAG, str(self.trial.number + 1))
        history = client.get_metric_history(self.run_id, self.study.metric)
        num_rounds = self.study.config.num_rounds
        for metric in sorted(history, key=lambda m: m.step):
            if metric.step < 1 or metric.step in self.reported or not math.isfinite(metric.value):
                continue
            if self.pruned_at is not None:
                # Rounds the run finished while it was being stopped: not part of the trial.
                return
            self.reported[metric.step] = metric.value
            self.trial.report(metric.value, metric.step)
            self.study.say(
                f"trial {self.trial.number + 1} round {metric.step}/{num_rounds}: "
                f"{self.study.metric} {metric.value:.4f}"
            )
            # The last round has nothing left to save.
            if may_prune and metric.step < num_rounds and self.trial.should_prune():
                if self.interrupts.interrupt():
                    self.pruned_at = metric.step
                return


class Interrupts:
    """Ctrl-C for a running simulation, sent by the round watcher to the main thread.

    ``radfl simulate`` stops its SuperLink and every process below it on Ctrl-C and returns
    130; that is how a pruned trial ends. A pruner's interrupt that arrives once the
    simulation has returned has nothing left to stop and is dropped; any other is the user's.
    """

    def __init__(self) -> None:
        self.in_flight = False
        #: The pruner interrupted the simulation in flight (reset for each trial).
        self.pruning = False
        #: Its interrupt has not reached the main thread yet.
        self.pending = False
        self._lock = threading.Lock()

    def interrupt(self) -> bool:
        """Interrupt the simulation in flight; whether one was."""
        with self._lock:
            if not self.in_flight:
                return False
            self.pruning = self.pending = True
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)
            return True

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.pending and not self.in_flight:
            self.pending = False
            return
        self.pending = False
        raise KeyboardInterrupt


@contextlib.contextmanager
def _interruptible() -> Iterator[Interrupts]:
    interrupts = Interrupts()
    previous = signal.signal(signal.SIGINT, interrupts.handle)
    try:
        yield interrupts
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _redirected(log: IO[str], *, keep: bool) -> Iterator[None]:
    if keep:
        yield
        return
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def _stop_new_children(before: set[int]) -> None:
    """Stop processes this one started during the trial and that outlived it (``flwr run``,
    which an interrupt of this process alone does not reach)."""
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for process in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(left, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _best_value(study: optuna.Study, value: float, higher_is_better: bool) -> float:
    complete = optuna.trial.TrialState.COMPLETE
    done = [t.value for t in study.trials if t.state == complete and t.value is not None]
    done.append(value)
    return max(done) if higher_is_better else min(done)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in values.items()]
