"""The coordinator's ServerApp: a Flower strategy by name, pooled evaluation, MLflow tracking."""

from __future__ import annotations

import time
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common import messages as keys
from common.config import ServerConfig, from_run_config
from common.tasks import get_task
from server import tracking
from server.rounds import RoundRecorder
from server.strategies import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-rounds`` rounds of federated training and evaluation, tracked in MLflow."""
    config = from_run_config(ServerConfig, context.run_config)
    task = get_task(config.model_config)
    model = task.build_model()
    buffer_keys = {name for name, _ in model.named_buffers()}
    started = time.monotonic()
    with tracking.start_run(config, mode="federated") as run:
        log(INFO, "[radfl] MLflow run %s at %s", run.info.run_id, tracking.tracking_uri())
        recorder = RoundRecorder(task, num_rounds=config.num_rounds)
        strategy = build_strategy(
            config,
            buffer_keys=buffer_keys,
            train_metrics_aggr_fn=recorder.aggregate_train,
            evaluate_metrics_aggr_fn=recorder.aggregate_evaluate,
        )
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=config.num_rounds,
            timeout=config.round_timeout_s,
            train_config=ConfigRecord({keys.NUM_ROUNDS: config.num_rounds}),
            evaluate_fn=recorder.end_of_round,
        )
        if recorder.rounds_completed == 0:
            log(WARNING, "[radfl] no round produced an aggregated model")
        tracking.log_metrics({"wall-time-s": time.monotonic() - started}, step=config.num_rounds)
        # With no aggregated round, Flower's result holds no arrays: the initial model is final.
        final = result.arrays if len(result.arrays) else ArrayRecord(model.state_dict())
        tracking.log_models(
            model,
            final_state=final.to_torch_state_dict(),
            best_state=recorder.best_state,
            best_round=recorder.best_round,
            config=config,
            register_as=tracking.registered_model_name(config),
        )
        log(INFO, "[radfl] finished; MLflow run %s", run.info.run_id)
