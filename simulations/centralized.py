"""``radfl centralized``: the same model trained on the pooled data of all synthetic sites.

The comparison federated learning is judged against. Same seed, same sites, same splits, and the
same sample budget: ``num-rounds`` blocks of ``local-epochs`` epochs over the pooled training
data, the learning-rate schedule stepping through the blocks as it steps through rounds. Each
block's validation metrics are logged to MLflow under the same names as a federated run's, and
the selected model gets the same end-of-run report (test splits, subgroups, plots, model card)
from each site's states, so the two runs compare table for table.
"""

from __future__ import annotations

import argparse
import time
from logging import INFO

from flwr.common.logger import log

from client.site import site_folder, synthetic_site
from client.trainer import ConcatLabelled, LocalTrainer
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.report import SPLITS, SplitStates
from common.splits import TEST, VALIDATION
from common.tasks import get_task
from server import final, tracking
from server.rounds import POOLED, TRAIN
from simulations.simulate import federation_data, run_config_overrides
from simulations.summary import print_summary


def centralized(args: argparse.Namespace) -> int:
    overrides = run_config_overrides(args)
    run_config = {**default_run_config(), **overrides}
    server_config = from_run_config(ServerConfig, run_config)
    client_config = from_run_config(ClientConfig, run_config)
    task = get_task(client_config.model_config)
    data_root = federation_data(args, overrides)
    sites = [
        synthetic_site(i, args.sites, client_config)
        if data_root is None
        else site_folder({"data-path": str(data_root / f"site-{i}")}, client_config)
        for i in range(args.sites)
    ]
    trainer = LocalTrainer(
        task,
        client_config,
        ConcatLabelled([s.train for s in sites]),
        ConcatLabelled([s.validation for s in sites]),
    )
    model = task.build_model()
    started = time.monotonic()
    print(
        f"RadFL centralized: pooled data of {args.sites} sites "
        f"({data_root or 'in memory'}; {len(trainer.train_set)} training samples), "
        f"{server_config.num_rounds} x {client_config.local_epochs} epochs, "
        f"{server_config.model}, seed {server_config.seed}; tracking to {tracking.tracking_uri()}",
        flush=True,
    )
    with tracking.start_run(server_config, mode="centralized", training=client_config) as run:
        best_value, best_round, best_state = None, None, None
        primary = task.metrics[task.primary_metric]
        untrained = trainer.evaluate(model).compute()
        tracking.log_metrics({f"{POOLED}/{k}": v for k, v in untrained.items()}, step=0)
        for block in range(1, server_config.num_rounds + 1):
            result = trainer.fit(model, server_round=block, num_rounds=server_config.num_rounds)
            metrics = trainer.evaluate(model).compute()
            logged = {f"{POOLED}/{k}": v for k, v in metrics.items()}
            logged[f"{TRAIN}/loss"] = result.train_loss
            tracking.log_metrics(logged, step=block)
            value = metrics[task.primary_metric]
            print(
                f"[radfl] block {block}/{server_config.num_rounds}: train loss "
                f"{result.train_loss:.4f} | pooled {task.primary_metric} {value:.4f}",
                flush=True,
            )
            if best_value is None or (
                value > best_value if primary.higher_is_better else value < best_value
            ):
                best_value, best_round = value, block
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        use_best = server_config.final_model == "best" and best_state is not None
        if use_best:
            model.load_state_dict(best_state)  # type: ignore[arg-type]
        selected_round = best_round if use_best else server_config.num_rounds
        splits = {
            split: SplitStates(client_config.num_classes, client_config.task) for split in SPLITS
        }
        for site in sites:
            for split, dataset in ((VALIDATION, site.validation), (TEST, site.test)):
                if dataset is None or len(dataset) == 0:
                    continue
                cells = trainer.evaluate_cells(model, dataset, client_config.subgroup_spec)
                splits[split].add_site(
                    site.name,
                    cells.overall.to_record(),
                    {name: states.to_record() for name, states in cells.cells.items()},
                    cells.patients,
                    cells.suppressed,
                )
        threshold = temperature = None
        if splits[TEST].sites:
            report = final.publish_report(
                final.evaluation_states(
                    server_config,
                    splits,
                    run_id=run.info.run_id,
                    mode="centralized",
                    selected_round=selected_round,
                    site_summary={
                        s.name: {
                            "train-images": len(s.train),
                            "validation-images": len(s.validation),
                            "test-images": len(s.test) if s.test is not None else 0,
                        }
                        for s in sites
                    },
                )
            )
            threshold, temperature = report.threshold, report.temperature
        wall_time_s = time.monotonic() - started
        tracking.log_metrics({"wall-time-s": wall_time_s}, step=server_config.num_rounds)
        tracking.log_models(
            model,
            final_state={k: v.detach().clone() for k, v in model.state_dict().items()},
            best_state=best_state,
            best_round=best_round,
            config=server_config,
            register_as=None,
            threshold=threshold,
            temperature=temperature,
        )
        log(INFO, "[radfl] centralized run %s finished", run.info.run_id)
    return print_summary(server_config, wall_time_s=wall_time_s)
