"""The coordinator's ServerApp: a Flower strategy by name, pooled evaluation, MLflow tracking.

A run: wait for ``min-sites`` sites and ask each for its split sizes (its name is the one
registered for its node, ``site-registry``, or in simulation the one it gives now); train for
``num-rounds`` rounds from random weights or the checked ``initial-weights``
(``server/transfer.py``), evaluating the global model on every site's validation split after
each; then evaluate the final model once on every site's validation and test splits (the only use of
the test splits), optionally run cross-site validation, and log the report to MLflow (and the
best rounds' models with ``snapshot-models``, ``server/snapshots.py``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from logging import INFO, WARNING

import mlflow
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import messages as keys
from common.config import RUN_FINISHED_LOG, ClientConfig, ServerConfig, from_run_config
from common.errors import ConfigError
from common.privacy import (
    BUDGET_STOP_TAG,
    ROUNDS_TRAINED_TAG,
    UpdateAccountant,
    private_model,
)
from common.report import Report
from common.report_files import fmt_ci
from common.tasks import get_task
from server import checkpoint, final, secagg, tracking
from server.rounds import RoundRecorder
from server.snapshots import SnapshotKeeper
from server.strategies import build_strategy, reply_policy, sampled_per_round
from server.transfer import load_initial_weights
from server.validation import ArrivalGrid, gate_of

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of federated training and evaluation, tracked in MLflow."""
    config = from_run_config(ServerConfig, context.run_config)
    task = get_task(config.model_config)
    model = task.build_model()
    if config.private_network:  # the sites' DP network: GroupNorm for BatchNorm
        model = private_model(model)
    # Transfer learning: checked weights as the first global model (and every baseline).
    transferred = load_initial_weights(config, model) if config.initial_weights else None
    if transferred is not None:
        model.load_state_dict(transferred.state)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    buffer_keys = {name for name, _ in model.named_buffers()}
    started = time.monotonic()
    saved = (
        checkpoint.checkpoint_path(config.checkpoint_dir, config.run_key)
        if config.checkpoint_dir
        else None
    )
    if config.resume and saved is None:
        raise ConfigError("resume needs checkpoint-dir (and the run-key of the run to resume)")
    resumed = checkpoint.load(saved) if config.resume and saved is not None else None
    resume_run_id = resumed["run-id"] if resumed else ""
    # The sites' training config: every ClientApp reads it from this run's config.
    training = from_run_config(ClientConfig, context.run_config)
    secagg.check_options(config, training)
    with tracking.start_run(
        config, mode="federated", training=training, resume_run_id=resume_run_id
    ) as run:
        log(INFO, "[radfl] MLflow run %s at %s", run.info.run_id, tracking.tracking_uri())
        if transferred is not None:
            _log_transfer(config.initial_weights, transferred.replaced_head)
        recorder = RoundRecorder(
            task, num_rounds=config.num_rounds, external_sites=config.left_out_sites
        )
        nodes = final.wait_for_sites(grid, config.min_sites, config.start_timeout_s)
        # A reply is the site of the node Flower authenticated: by the coordinator's registry
        # in deployment, by the name each node gives in this one query in simulation.
        registry = final.load_registry(config.site_registry) if config.site_registry else None
        sites = final.describe_sites(
            grid, nodes, config.round_timeout_s, registry, on_left_out=recorder.leave_out
        )
        left_out = _left_out_nodes(config, sites)
        log(
            INFO,
            "[radfl] %d sites: %s",
            len(sites),
            ", ".join(
                f"{s.name}{' (left out of training)' if s.node_id in left_out else ''}"
                for s in sorted(sites.values(), key=lambda s: s.name)
            ),
        )
        declared = {s.name: s.counts.get(keys.TRAIN_IMAGES, 0) for s in sites.values()}
        validation = {s.name: s.counts.get(keys.VALIDATION_IMAGES, 0) for s in sites.values()}
        training_sites = len(sites) - len(left_out)
        sampled = sampled_per_round(config, len(nodes), training_sites)
        accountant = (
            UpdateAccountant(
                config.dp_update_noise_multiplier, sampled / training_sites, config.dp_delta
            )
            if config.update_private
            else None
        )
        strategy = build_strategy(
            config,
            buffer_keys=buffer_keys,
            train_metrics_aggr_fn=recorder.aggregate_train,
            evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
            policy=reply_policy(config, declared, declared_validation=validation, task=task),
            node_names={node: s.name for node, s in sites.items()},
            on_reject=recorder.reject_update,
            on_failed_round=recorder.fail_round,
            on_traffic=recorder.record_traffic,
            on_reject_evaluation=recorder.reject_evaluation,
            sampled_sites=sampled,
            on_dp_round=(
                (lambda r: tracking.log_metrics({DP_EPSILON: accountant.epsilon(r)}, step=r))
                if accountant is not None
                else None
            ),
        )
        final.exclude_from_training(strategy, left_out)
        if resumed is None:
            # The untrained model's metrics at step 0: what every round is measured against.
            recorder.baseline(
                final.evaluate_everywhere(
                    grid, sites, initial_state, config.round_timeout_s, task=task
                ),
                keys.NUM_EXAMPLES,
            )
            start_arrays = ArrayRecord(model.state_dict())
        else:
            done = int(resumed["round"])
            log(INFO, "[radfl] resuming after round %d of %d", done, config.num_rounds)
            recorder.restore(resumed["recorder"], done)
            gate_of(strategy).offset = done
            checkpoint.restore_strategy(strategy, resumed["strategy"])
            checkpoint.restore_random_state(resumed["random"])
            start_arrays = ArrayRecord(resumed["arrays"])
            mlflow.set_tag("radfl.resumed-after-round", str(done))
            if not tracking.has_step(run.info.run_id, "round/failed", done):
                recorder.log_round(done, resumed["metrics"])  # it crashed before logging them
        snapshots = SnapshotKeeper(task, config.snapshot_models) if config.snapshot_models else None
        if saved is not None:
            recorder.after_round = lambda server_round, arrays, metrics: checkpoint.save(
                saved,
                {
                    "round": server_round,
                    "metrics": metrics,
                    "run-id": run.info.run_id,
                    "arrays": arrays.to_torch_state_dict(),
                    "strategy": checkpoint.strategy_state(strategy),
                    "recorder": recorder.snapshot(),
                    "random": checkpoint.random_state(),
                },
            )
        if snapshots is not None:
            recorder.after_round = _also(recorder.after_round, snapshots.offer)
        trained_rounds = config.num_rounds
        if accountant is not None:
            trained_rounds = accountant.affordable_rounds(
                config.dp_update_epsilon, config.num_rounds
            )
            log(
                INFO,
                "[radfl] update-level DP: %d of %d sites a round (rate %.3g), noise multiplier "
                "%g, clip %g: epsilon %.4g at delta %g after %d rounds",
                sampled,
                training_sites,
                accountant.sample_rate,
                config.dp_update_noise_multiplier,
                config.dp_update_clip_norm,
                accountant.epsilon(trained_rounds),
                config.dp_delta,
                trained_rounds,
            )
        remaining = max(0, trained_rounds - recorder.offset)
        training_grid = ArrivalGrid(grid, gate_of(strategy).receive)
        if config.secure_aggregation:  # SecAgg+: the server sees only the sum (server/secagg.py)
            training_grid = secagg.SecureAggregationGrid(
                grid, gate_of(strategy).receive, config, training,
                max_weight=max(declared.values()), on_reject=recorder.reject_update,
            )  # fmt: skip
        result = strategy.start(
            grid=training_grid,
            initial_arrays=start_arrays,
            num_rounds=remaining,
            timeout=config.round_timeout_s,
            train_config=ConfigRecord({keys.NUM_ROUNDS: config.num_rounds}),
            evaluate_fn=recorder.end_of_round,
        )
        if accountant is not None:
            _report_update_dp(config, accountant, trained_rounds, sampled, training_sites)
        if recorder.rounds_completed == 0:
            log(WARNING, "[radfl] no round produced an aggregated model")
        # With no aggregated round, Flower's result holds no arrays: the start model is final.
        last = result.arrays if len(result.arrays) else start_arrays
        last_state = last.to_torch_state_dict()
        use_best = config.final_model == "best" and recorder.best_state is not None
        selected = recorder.best_state if use_best else last_state
        selected_round = recorder.best_round if use_best else trained_rounds
        assert selected is not None  # last_state is never None
        log(
            INFO,
            "[radfl] final evaluation of the %s model (round %s)",
            config.final_model,
            selected_round,
        )
        splits, failed = final.final_evaluation(
            grid,
            sites,
            selected,
            config.num_classes,
            config.round_timeout_s,
            task=task,
            min_cell_size=config.min_cell_size,
            model_round=selected_round,
        )
        if failed:
            mlflow.set_tag("radfl.final-evaluation-failed", ", ".join(sorted(failed)))
        cross_site = (
            final.cross_site_validation(
                grid,
                sites,
                initial_state,
                selected,
                task,
                config.num_rounds,
                config.round_timeout_s,
            )
            if config.cross_site
            else None
        )
        states = final.evaluation_states(
            config,
            splits,
            run_id=run.info.run_id,
            mode="federated",
            selected_round=selected_round,
            site_summary={s.name: s.counts for s in sites.values()},
            cross_site=cross_site,
        )
        threshold = temperature = None
        if splits["test"].sites:
            extra_files = {
                "sites_by_round.csv": pd.DataFrame(recorder.site_rows).to_csv(index=False)
            }
            if accountant is not None:
                extra_files[UPDATE_DP_FILE] = json.dumps(
                    _update_dp_summary(config, accountant, trained_rounds, sampled, training_sites),
                    indent=2,
                )
            report = final.publish_report(states, extra_files=extra_files)
            threshold, temperature = report.threshold, report.temperature
            log(INFO, "[radfl] test %s", _headline(report))
        else:
            log(WARNING, "[radfl] no site returned test states; no report was written")
        tracking.log_metrics({"wall-time-s": time.monotonic() - started}, step=config.num_rounds)
        tracking.log_models(
            model,
            final_state=last_state,
            best_state=recorder.best_state,
            best_round=recorder.best_round,
            config=config,
            register_as=tracking.registered_model_name(config),
            registered_state=selected,
            threshold=threshold,
            temperature=temperature,
        )
        if snapshots is not None:
            snapshots.log()
    log(INFO, "%s %s", RUN_FINISHED_LOG, run.info.run_id)  # after the MLflow run has ended


#: MLflow metric of update-level DP's site-level epsilon, logged at each round's step.
DP_EPSILON = "dp-update/epsilon"
#: The report file holding update-level DP's settings and the epsilon reached.
UPDATE_DP_FILE = "dp_update.json"
#: The log line and MLflow tag of a run whose update-level DP budget stopped training.
BUDGET_STOP_LOG = "[radfl] update-level DP budget reached: training stops"


def _update_dp_summary(
    config: ServerConfig,
    accountant: UpdateAccountant,
    trained_rounds: int,
    sampled: int,
    training_sites: int,
) -> dict[str, float | int | bool]:
    return {
        "noise-multiplier": config.dp_update_noise_multiplier,
        "clip-norm": config.dp_update_clip_norm,
        "sites": training_sites,
        "sampled-sites": sampled,
        "sample-rate": accountant.sample_rate,
        "delta": config.dp_delta,
        "budget-epsilon": config.dp_update_epsilon,
        "rounds": trained_rounds,
        "epsilon": accountant.epsilon(trained_rounds),
        "stopped-by-budget": trained_rounds < config.num_rounds,
    }


def _report_update_dp(
    config: ServerConfig,
    accountant: UpdateAccountant,
    trained_rounds: int,
    sampled: int,
    training_sites: int,
) -> None:
    """The epsilon reached to MLflow (tag and final metric); the budget stop, if any, logged
    with the epsilon the next round would have reached."""
    spent = accountant.epsilon(trained_rounds)
    mlflow.set_tag("radfl.dp-update-epsilon", f"{spent:.6g} at delta {config.dp_delta:g}")
    tracking.log_metrics({f"{DP_EPSILON}-final": spent}, step=trained_rounds)
    if trained_rounds < config.num_rounds:
        after = accountant.epsilon(trained_rounds + 1)
        log(
            WARNING,
            "%s after round %d of %d: round %d would take the site-level epsilon to %.4g, past "
            "dp-update-epsilon = %g (spent %.4g at delta %g); the model so far is evaluated",
            BUDGET_STOP_LOG,
            trained_rounds,
            config.num_rounds,
            trained_rounds + 1,
            after,
            config.dp_update_epsilon,
            spent,
            config.dp_delta,
        )
        mlflow.set_tag(ROUNDS_TRAINED_TAG, str(trained_rounds))
        mlflow.set_tag(
            BUDGET_STOP_TAG,
            f"after round {trained_rounds} of {config.num_rounds}: round {trained_rounds + 1} "
            f"would reach epsilon {after:.4g} > {config.dp_update_epsilon:g}",
        )
    log(
        INFO,
        "[radfl] update-level DP: %s",
        _update_dp_summary(config, accountant, trained_rounds, sampled, training_sites),
    )


def _log_transfer(source: str, replaced_head: tuple[str, ...]) -> None:
    mlflow.set_tag("radfl.initial-weights", source)
    if replaced_head:
        mlflow.set_tag("radfl.initial-weights-new-head", ",".join(replaced_head))
    log(
        INFO,
        "[radfl] initial global model from %s (checksum verified)%s",
        source,
        f"; new head for the class count: {', '.join(replaced_head)}" if replaced_head else "",
    )


#: A recorder's ``after_round`` hook: round, global model, the round's metrics.
AfterRound = Callable[[int, ArrayRecord, dict[str, float]], None]


def _also(first: AfterRound | None, then: AfterRound) -> AfterRound:
    """A recorder hook calling ``first`` (if any), then ``then``."""

    def both(server_round: int, arrays: ArrayRecord, metrics: dict[str, float]) -> None:
        if first is not None:
            first(server_round, arrays, metrics)
        then(server_round, arrays, metrics)

    return both


def _left_out_nodes(config: ServerConfig, sites: dict[int, final.Site]) -> set[int]:
    if not sites:
        raise final.QuorumError(
            "no connected node described itself validly (the reasons are logged above and in "
            "robustness/rejections.csv)"
        )
    names = {s.name: node for node, s in sites.items()}
    unknown = sorted(set(config.left_out_sites) - set(names))
    if unknown:
        raise ConfigError(
            f"leave-out names unknown site(s) {', '.join(unknown)}; connected: "
            f"{', '.join(sorted(names))}"
        )
    if len(set(config.left_out_sites)) >= len(names):
        raise ConfigError("leave-out would leave no site to train on")
    return {names[name] for name in config.left_out_sites}


def _headline(report: Report) -> str:
    rows = report.overall.set_index("metric")
    parts = []
    for metric in report.headline[:3]:
        if metric in rows.index:
            value, low, high = (rows.loc[metric, c] for c in ("value", "low", "high"))
            parts.append(f"{metric} {fmt_ci(value, low, high)}")
    return ", ".join(parts)
