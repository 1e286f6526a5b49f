"""Keys of the records exchanged between the ServerApp and site ClientApps: one place for all."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS = "arrays"
"""ArrayRecord: model weights, both directions."""
CONFIG = "config"
"""ConfigRecord sent by the server (Flower's strategies add ``server-round``)."""
METRICS = "metrics"
"""MetricRecord replied by a site: ``num-examples``, training loss or metric states."""
SITE = "site"
"""ConfigRecord replied by a site: its name."""

NUM_EXAMPLES = "num-examples"
"""Number of samples (not batches) behind a reply; FedAvg weights by it."""
TRAIN_LOSS = "train-loss"
VALIDATION_LOSS = "validation-loss"
EPOCHS_RUN = "epochs-run"
SKIPPED_STEPS = "skipped-steps"
"""Local steps skipped because reduced precision gave a non-finite loss or gradient."""
DP_EPSILON = "dp-epsilon"
"""Epsilon a site has spent in the run with DP-SGD, at ``dp-delta`` (``common.privacy``)."""
DP_STUDIES_PER_PATIENT = "dp-studies-per-patient"
"""The most studies of one patient in a DP site's training split (group privacy)."""
SKIPPED_ROWS = "skipped-rows"
"""Manifest rows a site left out after its check (it opted into skipping bad rows)."""
PSEUDO_LABELS = "pseudo-labels"
"""Unlabelled studies a site pseudo-labelled and trained on this round (sent only when at least
the site's min-cell-size; ``client.pseudo_labels``)."""
SITE_NAME = "site-name"
SERVER_ROUND = "server-round"
MODEL_ROUND = "model-round"
"""The round whose global model a final evaluation evaluates (0: the start model): a FedBN site
uses its own normalisation layers of that round (``client.app``)."""
NUM_ROUNDS = "num-rounds"
PROXIMAL_MU = "proximal-mu"

# The site's description (query message), sent once before training.
TRAIN_IMAGES = "train-images"
VALIDATION_IMAGES = "validation-images"
TEST_IMAGES = "test-images"

# Final evaluation (message type ``evaluate.final``): one MetricRecord of states per split
# (``validation``, ``test``) and per split and sent subgroup cell (``test/sex=F``, which also
# holds ``patients``), and a ConfigRecord ``suppressed`` listing, per split, the cells the
# site held back.
FINAL_EVALUATION = "final"
SUPPRESSED = "suppressed"
PATIENTS = "patients"
REFUSED = "refused"
"""ConfigRecord of a final evaluation: subgroup attributes the site's disclosure policy refused,
each with a short reason (``client.disclosure``)."""

# Cross-site validation (message type ``train.local``): train only on the site's own data.
LOCAL_TRAINING = "local"
LOCAL_ROUNDS = "local-rounds"


def array_record(content: RecordDict, key: str = ARRAYS) -> ArrayRecord:
    """The ArrayRecord under ``key``; a missing or mistyped record names the key."""
    record = content.get(key)
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"message has no ArrayRecord {key!r}")
    return record


def metric_record(content: RecordDict, key: str = METRICS) -> MetricRecord:
    """The MetricRecord under ``key``; a missing or mistyped record names the key."""
    record = content.get(key)
    if not isinstance(record, MetricRecord):
        raise ValueError(f"message has no MetricRecord {key!r}")
    return record


def config_record(content: RecordDict, key: str) -> ConfigRecord | None:
    record = content.get(key)
    return record if isinstance(record, ConfigRecord) else None


def scalar(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A single number from a record; a missing key without default, or a list, raises."""
    if key not in record:
        if default is None:
            raise ValueError(f"record has no value {key!r}")
        return default
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(
            f"record value {key!r} must be a single number, got {type(value).__name__}"
        )
    return float(value)
