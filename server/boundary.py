"""Every field of every message a site sends, checked where it enters the server.

A site is not trusted with anything but its weights and counts, and those only within bounds.
Each function here takes one reply's content and returns a clean copy holding only the known
keys, every value of its type and in its range, or raises :class:`BadReplyError` naming the field.
The caller leaves the site out (of a round, of the final evaluation) with that reason; the
run goes on. What is checked:

- names (a site's claimed name, subgroup cells) are short safe slugs, so MLflow metric keys
  built from them never raise;
- counts are whole numbers in ``[0, MAX_COUNT]`` (no ``int(inf)``, no int64 wrap of 1e300);
- every float is finite (``validation-loss`` alone may be NaN: "not measured");
- metric states have the task's keys and sizes, are finite, non-negative and at most
  ``MAX_STATE`` (exact in float64); histogram totals equal the case count, and no count
  exceeds the split size the site declared when it joined;
- no record or key that the message type does not define.

A reply's own ``site`` record is never believed: :func:`stamp` writes the name of the node
Flower authenticated over it, and everything downstream reads that stamp.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from common import compression
from common import messages as keys
from common.metrics import ClassificationStates
from common.report import SPLITS
from common.tasks import MetricStates, Task

#: Largest count a site may report (images, patients, examples, steps).
MAX_COUNT = 10**9
#: Largest value of a metric state: float64 holds every whole number up to it exactly.
MAX_STATE = float(2**53)
#: Largest magnitude of a reported loss.
MAX_LOSS = 1e12
#: A site name: letters, digits, ``-`` and ``_``, 1 to 63 characters (no dots, no slashes).
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
#: A subgroup cell name (``sex=F``, ``age=<40``): printable, no slash, at most 100 characters.
CELL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,40}=[^/\x00-\x1f\x7f]{1,60}$")
#: Characters of error text from a site that reach the log.
MAX_TEXT = 300
#: Refused subgroup attributes one final evaluation reply may list.
MAX_REFUSED = 50

DESCRIBE_KEYS = (keys.TRAIN_IMAGES, keys.VALIDATION_IMAGES, keys.TEST_IMAGES)
#: Declared size behind each split a site evaluates.
SPLIT_IMAGES = {"validation": keys.VALIDATION_IMAGES, "test": keys.TEST_IMAGES}


class BadReplyError(ValueError):
    """A reply (or one of its fields) the server will not use; the message says why."""


@dataclass(frozen=True)
class Description:
    """What a site's join-query reply says about it."""

    claimed_name: str | None
    counts: dict[str, int]


def check_site_name(name: object) -> str:
    """``name`` if it is a safe site name, else :class:`BadReplyError`."""
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise BadReplyError(
            f"site name {clean_text(repr(name), 80)} is not 1-63 letters, digits, '-' or '_'"
        )
    return name


def clean_text(text: object, limit: int = MAX_TEXT) -> str:
    """Text from a site, fit for a log line: printable characters only, at most ``limit``."""
    flat = re.sub(r"[^\x20-\x7e]", "?", str(text))
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def count(value: object, key: str, maximum: int = MAX_COUNT, minimum: int = 0) -> int:
    """A whole number in ``[minimum, maximum]`` (an int, or a float with no fraction)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadReplyError(f"{key} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value != math.floor(value):
        raise BadReplyError(f"{key} must be a whole number, got {value!r}")
    if not minimum <= value <= maximum:
        raise BadReplyError(f"{key} = {value:g} is outside [{minimum}, {maximum}]")
    return int(value)


def finite(value: object, key: str, bound: float = MAX_LOSS, allow_nan: bool = False) -> float:
    """A finite float of magnitude at most ``bound`` (NaN too, with ``allow_nan``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadReplyError(f"{key} must be a number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) and allow_nan:
        return number
    if not math.isfinite(number) or abs(number) > bound:
        raise BadReplyError(f"{key} = {number!r} is not a finite number within +-{bound:g}")
    return number


def stamp(content: RecordDict, name: str) -> None:
    """Write the authenticated site name into a reply (over whatever it claimed)."""
    content[keys.SITE] = ConfigRecord({keys.SITE_NAME: name})


# ----------------------------------------------------------------------- join query
def check_description(content: RecordDict) -> Description:
    """A join-query reply: its split sizes (``train-images`` ... , ``skipped-rows``)."""
    _only_records(content, {keys.METRICS: MetricRecord, keys.SITE: ConfigRecord})
    metrics = _record(content, keys.METRICS, MetricRecord)
    _only_keys(metrics, keys.METRICS, (*DESCRIBE_KEYS, keys.SKIPPED_ROWS))
    counts = {}
    for key in DESCRIBE_KEYS:
        if key not in metrics:
            raise BadReplyError(f"metrics lack {key!r}")
        counts[key] = count(metrics[key], key)
    counts[keys.SKIPPED_ROWS] = count(metrics.get(keys.SKIPPED_ROWS, 0), keys.SKIPPED_ROWS)
    site = content.get(keys.SITE)
    claimed = None
    if isinstance(site, ConfigRecord) and keys.SITE_NAME in site:
        claimed = check_site_name(site[keys.SITE_NAME])
    return Description(claimed, counts)


# ---------------------------------------------------------------------- train reply
#: Metrics of a training reply, with their defaults when left out (None: required).
TRAIN_METRICS: dict[str, float | None] = {
    keys.NUM_EXAMPLES: None,
    keys.TRAIN_LOSS: None,
    keys.VALIDATION_LOSS: math.nan,
    keys.EPOCHS_RUN: 0,
    keys.SKIPPED_STEPS: 0,
    keys.SKIPPED_ROWS: 0,
}
#: Metrics a training reply may carry (DP-SGD sites, ``common.privacy``): passed on only
#: when sent, so a run without DP logs no epsilon.
TRAIN_OPTIONAL = (keys.DP_EPSILON, keys.DP_STUDIES_PER_PATIENT, keys.PSEUDO_LABELS)
#: The largest epsilon a site may report spent (beyond it, a number means nothing).
MAX_EPSILON = 1e6
TRAIN_RECORDS = {
    # Checked against the global model by server.validation (after decoding).
    keys.ARRAYS: None,
    compression.COMPRESSION: None,
    compression.SCALES: None,
    keys.METRICS: MetricRecord,
    keys.SITE: ConfigRecord,
}


def check_train_metrics(content: RecordDict, max_examples: int) -> MetricRecord:
    """The metrics of a training reply, every key present and in range.

    ``num-examples`` must be a whole number in ``[1, max_examples]`` (``max_examples`` is
    the training split the site declared, or the run's ``max-num-examples``).
    """
    _only_records(content, TRAIN_RECORDS)
    metrics = _record(content, keys.METRICS, MetricRecord)
    _only_keys(metrics, keys.METRICS, (*TRAIN_METRICS, *TRAIN_OPTIONAL))
    clean: dict[str, int | float] = {}
    if keys.DP_EPSILON in metrics:
        epsilon = finite(metrics[keys.DP_EPSILON], keys.DP_EPSILON, bound=MAX_EPSILON)
        if epsilon < 0:
            raise BadReplyError(f"{keys.DP_EPSILON} = {epsilon!r} is negative")
        clean[keys.DP_EPSILON] = epsilon
    if keys.PSEUDO_LABELS in metrics:  # pseudo-labelled studies (client.pseudo_labels)
        value = metrics[keys.PSEUDO_LABELS]
        withheld = isinstance(value, float) and math.isnan(value)  # fewer than the site's k
        clean[keys.PSEUDO_LABELS] = math.nan if withheld else count(value, keys.PSEUDO_LABELS)
    if keys.DP_STUDIES_PER_PATIENT in metrics:
        clean[keys.DP_STUDIES_PER_PATIENT] = count(
            metrics[keys.DP_STUDIES_PER_PATIENT], keys.DP_STUDIES_PER_PATIENT
        )
    for key, default in TRAIN_METRICS.items():
        if key not in metrics and default is None:
            raise BadReplyError(f"metrics lack {key!r}")
        value = metrics.get(key, default)
        if key == keys.NUM_EXAMPLES:
            clean[key] = count(value, key, maximum=max_examples, minimum=1)
        elif key in (keys.TRAIN_LOSS, keys.VALIDATION_LOSS):
            clean[key] = finite(value, key, allow_nan=key == keys.VALIDATION_LOSS)
        else:
            clean[key] = count(value, key)
    return MetricRecord(clean)  # type: ignore[arg-type]


# ------------------------------------------------------------------- evaluate reply
def check_evaluate(content: RecordDict, task: Task, max_examples: int) -> MetricRecord:
    """The metrics of an ``evaluate`` reply: ``num-examples`` (at most ``max_examples``,
    the validation split the site declared) and the task's metric states."""
    _only_records(content, {keys.METRICS: MetricRecord, keys.SITE: ConfigRecord})
    metrics = _record(content, keys.METRICS, MetricRecord)
    examples = count(metrics.get(keys.NUM_EXAMPLES), keys.NUM_EXAMPLES, maximum=max_examples)
    states, _ = check_states(metrics, task, keys.NUM_EXAMPLES, examples, keys.METRICS)
    return MetricRecord({keys.NUM_EXAMPLES: examples, **states})  # type: ignore[dict-item]


def check_states(
    record: Mapping[str, Any], task: Task, count_key: str, cases: int, where: str
) -> tuple[dict[str, list[float]], MetricStates]:
    """The task's metric states in ``record`` (beside ``count_key``), checked and pooled
    once: finite, non-negative, exact, of the task's sizes, covering at most ``cases``."""
    empty = task.new_states().to_record()
    _only_keys(record, where, (count_key, *empty))
    clean: dict[str, list[float]] = {}
    for key, like in empty.items():
        value = record.get(key)
        if value is None:
            raise BadReplyError(f"{where} lack the metric state {key!r}")
        items = value if isinstance(value, list) else [value]
        if len(items) != len(like):
            raise BadReplyError(f"{where}: {key} has {len(items)} values, expected {len(like)}")
        array = np.asarray(
            [float(v) if isinstance(v, int | float) else math.nan for v in items], np.float64
        )
        if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > MAX_STATE):
            raise BadReplyError(f"{where}: {key} must be finite, non-negative and at most 2**53")
        clean[key] = array.tolist()
    try:
        states = task.pool([clean])
    except ValueError as exc:
        raise BadReplyError(f"{where}: {exc}") from exc
    check_totals(states, cases, where)
    return clean, states


def check_totals(states: MetricStates, cases: int, where: str) -> None:
    """The states cover at most ``cases`` cases, and their histograms add up to that count."""
    total = int(getattr(states, "count", 0))
    if total > cases:
        raise BadReplyError(
            f"{where}: the states count {total} cases, more than the {cases} reported"
        )
    if isinstance(states, ClassificationStates):
        try:
            states.check_totals()
        except ValueError as exc:
            raise BadReplyError(f"{where}: {exc}") from exc


# ----------------------------------------------------------------- final evaluation
@dataclass(frozen=True)
class FinalReply:
    """A checked ``evaluate.final`` reply, split by split."""

    overall: dict[str, MetricRecord]
    cells: dict[str, dict[str, MetricRecord]]
    patients: dict[str, dict[str, int]]
    suppressed: dict[str, list[str]]
    #: Subgroup attributes the site's disclosure policy refused, each with its reason.
    refused: dict[str, str]


def check_final(content: RecordDict, task: Task, declared: Mapping[str, int]) -> FinalReply:
    """An ``evaluate.final`` reply: per split (``validation``, ``test``) the overall states
    and those of each subgroup cell, and the cells held back. A split's ``num-examples`` is
    at most the size the site declared for it (``declared``: its join-query counts)."""
    overall: dict[str, MetricRecord] = {}
    cells: dict[str, dict[str, MetricRecord]] = {}
    patients: dict[str, dict[str, int]] = {}
    for key in content:
        split, sep, cell = key.partition("/")
        if key in (keys.SITE, keys.SUPPRESSED, keys.REFUSED) or (
            split in SPLITS and (not sep or cell)
        ):
            continue
        raise BadReplyError(f"unknown record {clean_text(key, 80)!r} in the final evaluation")
    for split in SPLITS:
        if split not in content:
            continue
        record = _record(content, split, MetricRecord)
        limit = declared.get(SPLIT_IMAGES[split], 0)
        cases = count(record.get(keys.NUM_EXAMPLES), f"{split} {keys.NUM_EXAMPLES}", limit)
        states, _ = check_states(record, task, keys.NUM_EXAMPLES, cases, split)
        overall[split] = MetricRecord({keys.NUM_EXAMPLES: cases, **states})  # type: ignore[dict-item]
        for key in content:
            prefix, sep, cell = key.partition("/")
            if prefix != split or not sep:
                continue
            check_cell_name(cell)
            cell_record = _record(content, key, MetricRecord)
            people = count(cell_record.get(keys.PATIENTS), f"{key} {keys.PATIENTS}", cases)
            cell_states, pooled = check_states(cell_record, task, keys.PATIENTS, cases, key)
            if people > int(getattr(pooled, "count", people)):
                raise BadReplyError(f"{key}: {people} patients but fewer cases")
            cells.setdefault(split, {})[cell] = MetricRecord(cell_states)  # type: ignore[arg-type]
            patients.setdefault(split, {})[cell] = people
    suppressed: dict[str, list[str]] = {}
    held = content.get(keys.SUPPRESSED)
    if held is not None:
        if not isinstance(held, ConfigRecord):
            raise BadReplyError(f"record {keys.SUPPRESSED!r} must be a ConfigRecord")
        _only_keys(held, keys.SUPPRESSED, SPLITS)
        for split, names in held.items():
            listed = names if isinstance(names, list) else [names]
            suppressed[split] = [check_cell_name(name) for name in listed]
    refused: dict[str, str] = {}
    said = content.get(keys.REFUSED)
    if said is not None:
        if not isinstance(said, ConfigRecord):
            raise BadReplyError(f"record {keys.REFUSED!r} must be a ConfigRecord")
        if len(said) > MAX_REFUSED:
            raise BadReplyError(f"record {keys.REFUSED!r} names {len(said)} attributes")
        for attribute, reason in said.items():
            refused[clean_text(attribute, 40)] = clean_text(reason, 200)
    return FinalReply(overall, cells, patients, suppressed, refused)


def check_cell_name(name: object) -> str:
    if not isinstance(name, str) or not CELL_NAME.match(name):
        raise BadReplyError(
            f"subgroup cell name {clean_text(repr(name), 80)} is not ATTRIBUTE=VALUE"
        )
    return name


# -------------------------------------------------------------------------- helpers
def _record(content: RecordDict, key: str, kind: type) -> Any:
    record = content.get(key)
    if not isinstance(record, kind):
        raise BadReplyError(f"reply has no {kind.__name__} {key!r}")
    return record


def _only_records(content: RecordDict, allowed: Mapping[str, type | None]) -> None:
    unknown = sorted(set(content) - set(allowed))
    if unknown:
        raise BadReplyError(f"unknown record(s) {clean_text(', '.join(unknown), 120)} in the reply")
    for key, kind in allowed.items():
        if kind is not None and key in content and not isinstance(content[key], kind):
            raise BadReplyError(f"record {key!r} must be a {kind.__name__}")


def _only_keys(record: Mapping[str, Any], where: str, allowed: Iterable[str]) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise BadReplyError(f"{where}: unknown key(s) {clean_text(', '.join(unknown), 120)}")
