"""Per-round bookkeeping of the ServerApp: pooled metrics from summed states, progress, best model.

Flower calls the aggregation functions with the replies of one round and then ``evaluate_fn``
with the round number; the recorder keeps what the aggregators computed until that call, then
logs it to MLflow at the round's step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common.logger import log

from common import messages as keys
from common.tasks import Task
from server import tracking

POOLED = "pooled"
TRAIN = "train"
SITE = "site"
EXTERNAL = "external"
TRAFFIC = "traffic"


def reply_site_name(record: RecordDict) -> str:
    """The site a reply is from: the name the reply gate stamped on it from the node Flower
    authenticated (``server.boundary.stamp``)."""
    site = keys.config_record(record, keys.SITE)
    return str(site[keys.SITE_NAME]) if site is not None and keys.SITE_NAME in site else "unknown"


_metric_record = keys.metric_record


class RoundRecorder:
    """Pools evaluation states, logs every round to the active MLflow run, keeps the best model."""

    def __init__(self, task: Task, num_rounds: int, external_sites: Iterable[str] = ()) -> None:
        self.task = task
        self.num_rounds = num_rounds
        #: Sites left out of training: evaluated each round, kept out of the pooled values.
        self.external_sites = frozenset(external_sites)
        #: One row per round and evaluated site: the per-site validation table.
        self.site_rows: list[dict[str, Any]] = []
        self.pending_rows: list[dict[str, Any]] = []
        self.primary = task.metrics[task.primary_metric]
        self.pending: dict[str, float] = {}
        self.site_status: dict[str, list[str]] = {}
        self.best_value: float | None = None
        self.best_round: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.rounds_completed = 0
        #: Training replies left out of aggregation and failed rounds: (round, site, reason).
        self.rejections: list[dict[str, Any]] = []
        #: Rounds done before this ``start`` (a resumed run); Flower counts from 1 again.
        self.offset = 0
        #: Called with ``(round, global arrays, round metrics)`` after each round, before its
        #: metrics are logged (checkpoints).
        self.after_round: Callable[[int, ArrayRecord, dict[str, float]], None] | None = None

    SNAPSHOT = (
        "site_rows",
        "best_value",
        "best_round",
        "best_state",
        "rounds_completed",
        "rejections",
    )

    def snapshot(self) -> dict[str, Any]:
        """What a resumed run needs to carry on: best model, tables, counters."""
        return {name: getattr(self, name) for name in self.SNAPSHOT}

    def restore(self, snapshot: dict[str, Any], rounds_done: int) -> None:
        for name in self.SNAPSHOT:
            setattr(self, name, snapshot[name])
        self.offset = rounds_done

    # Flower's train_metrics_aggr_fn
    def aggregate_train(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        total = sum(keys.scalar(_metric_record(r), weighted_by_key) for r in records)
        weighted_loss = sum(
            keys.scalar(_metric_record(r), keys.TRAIN_LOSS)
            * keys.scalar(_metric_record(r), weighted_by_key)
            for r in records
        )
        out: dict[str, float] = {
            f"{TRAIN}/loss": weighted_loss / total if total else math.nan,
            f"{TRAIN}/num-examples": total,
            f"{TRAIN}/sites": float(len(records)),
        }
        for record in records:
            name = reply_site_name(record)
            metrics = _metric_record(record)
            out[f"{SITE}/{name}/train-loss"] = keys.scalar(metrics, keys.TRAIN_LOSS)
            out[f"{SITE}/{name}/num-examples"] = keys.scalar(metrics, weighted_by_key)
            out[f"{SITE}/{name}/skipped-rows"] = keys.scalar(metrics, keys.SKIPPED_ROWS, 0.0)
            out[f"{SITE}/{name}/skipped-steps"] = keys.scalar(metrics, keys.SKIPPED_STEPS, 0.0)
            for key in (keys.DP_EPSILON, keys.DP_STUDIES_PER_PATIENT, keys.PSEUDO_LABELS):
                # DP-SGD: the epsilon the site has spent so far; pseudo-labels when >= k (NaN:
                # fewer, withheld at the site)
                if key in metrics and math.isfinite(keys.scalar(metrics, key)):
                    out[f"{SITE}/{name}/{key}"] = keys.scalar(metrics, key)
            self.site_status.setdefault(name, []).append("trained")
        self.pending.update(out)
        self.rounds_completed += 1
        return _to_record(out)

    # Flower's evaluate_metrics_aggr_fn
    def aggregate_evaluate(self, records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
        out: dict[str, float] = {}
        valid = []
        for record in records:
            name = reply_site_name(record)
            try:
                self.task.pool([_metric_record(record)])
            except ValueError as exc:
                # One site's bad states must not end the run: leave it out of this round.
                log(WARNING, "[radfl] round evaluation of site %s rejected: %s", name, exc)
                out[f"{SITE}/{name}/rejected-evaluation"] = 1.0
                self.site_status.setdefault(name, []).append("rejected")
                continue
            valid.append(record)
        records = valid
        internal = [r for r in records if reply_site_name(r) not in self.external_sites]
        pooled = self.task.pool(_metric_record(r) for r in internal).compute()
        out.update({f"{POOLED}/{name}": value for name, value in pooled.items()})
        out[f"{POOLED}/num-examples"] = sum(
            keys.scalar(_metric_record(r), weighted_by_key) for r in internal
        )
        for record in records:
            name = reply_site_name(record)
            role = EXTERNAL if name in self.external_sites else SITE
            per_site = self.task.pool([_metric_record(record)]).compute()
            out.update({f"{role}/{name}/{metric}": value for metric, value in per_site.items()})
            self.site_status.setdefault(name, []).append("evaluated")
            self.pending_rows.append(
                {
                    "site": name,
                    "role": "external" if role == EXTERNAL else "training",
                    "n": int(keys.scalar(_metric_record(record), weighted_by_key)),
                    **per_site,
                }
            )
        self.pending.update(out)
        return _to_record(out)

    # validation.ValidatedAggregation's callbacks
    def reject_update(self, server_round: int, site: str, reason: str) -> None:
        """A site's training reply was left out of this round's aggregation."""
        log(WARNING, "[radfl] round %d: update of %s rejected: %s", server_round, site, reason)
        self.pending[f"{SITE}/{site}/rejected-update"] = 1.0
        self.site_status.setdefault(site, []).append("rejected")
        self.rejections.append({"round": server_round, "site": site, "reason": reason})

    def reject_evaluation(self, server_round: int, site: str, reason: str) -> None:
        """A site's evaluation reply was left out of this round's pooled metrics."""
        log(WARNING, "[radfl] round %d: evaluation of %s rejected: %s", server_round, site, reason)
        self.pending[f"{SITE}/{site}/rejected-evaluation"] = 1.0
        self.site_status.setdefault(site, []).append("rejected")
        self.rejections.append({"round": server_round, "site": site, "reason": reason})

    def leave_out(self, who: str, reason: str) -> None:
        """A node left out of the whole run before training (recorded at round 0)."""
        self.rejections.append({"round": 0, "site": who, "reason": f"left out: {reason}"})
        tracking.log_text(
            pd.DataFrame(self.rejections).to_csv(index=False), "robustness/rejections.csv"
        )

    def fail_round(self, server_round: int, reason: str) -> None:
        """No aggregation this round: the global model is kept."""
        log(WARNING, "[radfl] round %d failed: %s", server_round, reason)
        self.pending["round/failed"] = 1.0
        self.rejections.append(
            {"round": server_round, "site": "", "reason": f"round failed: {reason}"}
        )

    def record_traffic(self, server_round: int, received: dict[str, int], model_bytes: int) -> None:
        """Bytes each site's training reply carried (weights or compressed update), against
        the float32 model's size: ``traffic/update-bytes`` is the mean over sites."""
        for site, size in received.items():
            self.pending[f"{SITE}/{site}/update-bytes"] = float(size)
        self.pending[f"{TRAFFIC}/model-bytes"] = float(model_bytes)
        if received:
            mean = sum(received.values()) / len(received)
            self.pending[f"{TRAFFIC}/update-bytes"] = mean
            self.pending[f"{TRAFFIC}/update-ratio"] = mean / model_bytes if model_bytes else 0.0

    def baseline(self, records: list[RecordDict], weighted_by_key: str) -> dict[str, float]:
        """Log the untrained model's pooled and per-site validation metrics at step 0."""
        out = self.aggregate_evaluate(records, weighted_by_key)
        self.pending, self.pending_rows, self.site_status = {}, [], {}
        metrics = {k: float(v) for k, v in out.items() if isinstance(v, int | float)}
        tracking.log_metrics(metrics, step=0)
        log(
            INFO,
            "[radfl] untrained model: pooled %s %.4f",
            self.task.primary_metric,
            metrics.get(f"{POOLED}/{self.task.primary_metric}", math.nan),
        )
        return metrics

    # Flower's evaluate_fn: called at round 0 and after each round
    def end_of_round(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        server_round += self.offset
        metrics, self.pending = self.pending, {}
        self.site_rows += [{"round": server_round, **row} for row in self.pending_rows]
        self.pending_rows = []
        metrics.setdefault("round/failed", 0.0)
        value = metrics.get(f"{POOLED}/{self.task.primary_metric}", math.nan)
        if math.isfinite(value) and (
            self.best_value is None
            or (
                value > self.best_value
                if self.primary.higher_is_better
                else value < self.best_value
            )
        ):
            self.best_value, self.best_round = value, server_round
            self.best_state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        # Checkpoint first, with the round's metrics: a crash before they reach MLflow leaves
        # them in the checkpoint, and the resumed run logs them (see log_round).
        if self.after_round is not None:
            self.after_round(server_round, arrays, metrics)
        self.log_round(server_round, metrics)
        self._log_progress(server_round, metrics, value)
        self.site_status = {}
        return None

    def log_round(self, server_round: int, metrics: dict[str, float]) -> None:
        """Log one round's metrics (and the rejections so far) to MLflow."""
        tracking.log_metrics(metrics, step=server_round)
        if self.rejections:
            tracking.log_text(
                pd.DataFrame(self.rejections).to_csv(index=False), "robustness/rejections.csv"
            )

    def _log_progress(self, server_round: int, metrics: dict[str, Any], value: float) -> None:
        sites = ", ".join(
            f"{name}: {'+'.join(status)}"
            + (" [external]" if name in self.external_sites else "")
            + _fmt(
                metrics.get(
                    f"{SITE}/{name}/{self.task.primary_metric}",
                    metrics.get(f"{EXTERNAL}/{name}/{self.task.primary_metric}"),
                ),
                self.task.primary_metric,
            )
            for name, status in sorted(self.site_status.items())
        )
        if not self.site_status:
            log(WARNING, "[radfl] round %d/%d: no site replied", server_round, self.num_rounds)
            return
        log(
            INFO,
            "[radfl] round %d/%d: train loss %.4f | pooled %s %.4f, loss %.4f | %s",
            server_round,
            self.num_rounds,
            metrics.get(f"{TRAIN}/loss", math.nan),
            self.task.primary_metric,
            value,
            metrics.get(f"{POOLED}/loss", math.nan),
            sites,
        )


def _to_record(values: dict[str, float]) -> MetricRecord:
    return MetricRecord(cast(dict[str, int | float | list[int] | list[float]], values))


def _fmt(value: Any, name: str) -> str:
    if value is None or not np.isfinite(value):
        return ""
    return f" ({name} {value:.3f})"
