"""What a site agrees to disclose: its own policy, enforced in the ClientApp whatever the run asks.

The coordinator's run config asks for subgroups, a minimum cell size and evaluations; the
hospital decides, in its node config (``radfl site start`` options), what it will answer:

==============================  ==================================================================
node config key                 meaning (default)
==============================  ==================================================================
``subgroup-attributes``         the subgroup attributes the site reports, comma-separated
                                (``sex,age,manufacturer,modality``); any other attribute the run
                                asks for is refused by name and nothing of it is computed or sent.
                                Identifier and path columns (``patient_id``, ``study_id``,
                                ``image``, ...) can never be listed.
``min-cell-size``               the site's floor k (10): a run asking for less gets this
``max-evaluations``             evaluations (``evaluate`` and ``evaluate.final``) the site answers
                                per run (1000)
``max-evaluations-per-model``   evaluations of one and the same model per run (3: its round, the
                                final evaluation and cross-site validation)
``dp-epsilon``                  the site's own privacy budget (0: none): it trains only with DP-SGD
                                and stops at the smaller of this and the run's ``dp-epsilon``
==============================  ==================================================================

A refused attribute travels back as its name and a short reason in the ``refused`` record of
the final evaluation; the rest of the reply goes as usual. An evaluation past a cap is answered
with an error whose reason names the cap; the server logs it and leaves the site out of that
evaluation.

With DP-SGD (``common.privacy``), :func:`privacy_budget` refuses a training round that would
take the site past its epsilon budget, and :func:`privacy_spent` reports what it has spent.

In Flower's simulation engine virtual sites have no node config of their own: ``radfl simulate
--node-config`` puts the keys in ``RADFL_SIMULATION_NODE_CONFIG`` (JSON), which every virtual
site reads here (a real SuperNode's node config ignores it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from common import manifest as mf
from common import messages as keys
from common.config import ClientConfig, from_run_config
from common.errors import ConfigError
from common.privacy import PrivacyLedger
from common.subgroups import SITE_ATTRIBUTE, SubgroupSpec

#: ``radfl simulate --node-config``: node config of every virtual site, as JSON.
SIMULATION_NODE_CONFIG_ENV = "RADFL_SIMULATION_NODE_CONFIG"

DEFAULT_ATTRIBUTES: tuple[str, ...] = (mf.SEX, mf.AGE, mf.MANUFACTURER, mf.MODALITY)
DEFAULT_MIN_CELL_SIZE = 10
DEFAULT_MAX_EVALUATIONS = 1000
DEFAULT_MAX_EVALUATIONS_PER_MODEL = 3
#: Columns no policy may report: identifiers, file paths and labels.
NEVER_REPORTED = frozenset(
    {mf.PATIENT_ID, mf.STUDY_ID, mf.IMAGE, mf.LABEL, mf.BOXES, *mf.PATH_COLUMNS}
)

ATTRIBUTES_KEY = "subgroup-attributes"
MIN_CELL_SIZE_KEY = "min-cell-size"
MAX_EVALUATIONS_KEY = "max-evaluations"
MAX_EVALUATIONS_PER_MODEL_KEY = "max-evaluations-per-model"
DP_EPSILON_KEY = "dp-epsilon"

#: ``context.state`` record counting the evaluations this site answered in the run.
EVALUATION_COUNTS = "radfl.evaluation-counts"
_RUN_COUNT = "run"


#: Error code of a refusal: Flower's "a precondition failed" (the site's policy).
REFUSED = ErrorCode.MOD_FAILED_PRECONDITION


def refusal(msg: Message, reason: str) -> Message:
    """The reply of a site that refuses ``msg``: an error whose reason the server logs."""
    return Message(Error(code=REFUSED, reason=reason), reply_to=msg)


@dataclass(frozen=True)
class DisclosurePolicy:
    """A site's disclosure policy (see the module docstring for the node config keys)."""

    attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
    min_cell_size: int = DEFAULT_MIN_CELL_SIZE
    max_evaluations: int = DEFAULT_MAX_EVALUATIONS
    max_evaluations_per_model: int = DEFAULT_MAX_EVALUATIONS_PER_MODEL
    dp_epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.dp_epsilon < 0:
            raise ConfigError(f"node config {DP_EPSILON_KEY} must be >= 0, got {self.dp_epsilon}")
        identifiers = sorted(set(self.attributes) & NEVER_REPORTED)
        if identifiers:
            raise ConfigError(
                f"node config {ATTRIBUTES_KEY} lists {', '.join(identifiers)}: identifiers, "
                "file paths and labels are never reported as subgroups"
            )
        for key, value in (
            (MIN_CELL_SIZE_KEY, self.min_cell_size),
            (MAX_EVALUATIONS_KEY, self.max_evaluations),
            (MAX_EVALUATIONS_PER_MODEL_KEY, self.max_evaluations_per_model),
        ):
            if value < 1:
                raise ConfigError(f"node config {key} must be >= 1, got {value}")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> DisclosurePolicy:
        """The policy a site's node config sets; a bad value names its key."""
        config = site_node_config(node_config)
        attributes: tuple[str, ...] = DEFAULT_ATTRIBUTES
        if ATTRIBUTES_KEY in config:
            text = str(config[ATTRIBUTES_KEY])
            attributes = tuple(a.strip() for a in text.split(",") if a.strip())
        return cls(
            attributes=attributes,
            min_cell_size=_integer(config, MIN_CELL_SIZE_KEY, DEFAULT_MIN_CELL_SIZE),
            max_evaluations=_integer(config, MAX_EVALUATIONS_KEY, DEFAULT_MAX_EVALUATIONS),
            max_evaluations_per_model=_integer(
                config, MAX_EVALUATIONS_PER_MODEL_KEY, DEFAULT_MAX_EVALUATIONS_PER_MODEL
            ),
            dp_epsilon=_number(config, DP_EPSILON_KEY, 0.0),
        )

    def privacy_budget(self, run_budget: float) -> float:
        """The epsilon at which the site stops training: the smaller of its own and the run's
        (0: no budget)."""
        budgets = [b for b in (self.dp_epsilon, run_budget) if b > 0]
        return min(budgets) if budgets else 0.0

    def apply(self, spec: SubgroupSpec) -> tuple[SubgroupSpec, dict[str, Any]]:
        """The run's subgroup request cut down to this policy.

        Returns
        -------
        spec : SubgroupSpec
            Only the attributes the site reports (``site`` is the server's own and stays),
            with ``min_cell_size = max(site floor, run)``.
        refused : dict of str to str
            Each refused attribute and why, short enough to send back.
        """
        allowed: list[str] = []
        refused: dict[str, Any] = {}
        for attribute in spec.attributes:
            if attribute == SITE_ATTRIBUTE or attribute in self.attributes:
                allowed.append(attribute)
            elif attribute in NEVER_REPORTED:
                refused[attribute] = "an identifier, path or label column is never reported"
            else:
                refused[attribute] = (
                    f"not in the site's {ATTRIBUTES_KEY} ({', '.join(self.attributes)})"
                )
        k = max(self.min_cell_size, spec.min_cell_size)
        return replace(spec, attributes=tuple(allowed), min_cell_size=k), refused

    def admit_evaluation(self, msg: Message, context: Context) -> Message | None:
        """Count an evaluation request in ``context.state``; past a cap, the refusal to send
        back instead of evaluating (``None``: go ahead)."""
        counts = context.state.get(EVALUATION_COUNTS)
        if not isinstance(counts, ConfigRecord):
            counts = ConfigRecord()
        model = f"model:{model_digest(msg)}"
        run_count = int(counts.get(_RUN_COUNT, 0))  # type: ignore[arg-type]
        model_count = int(counts.get(model, 0))  # type: ignore[arg-type]
        if run_count >= self.max_evaluations:
            reason = (
                f"site refuses {msg.metadata.message_type}: it answers at most "
                f"{self.max_evaluations} evaluations per run ({MAX_EVALUATIONS_KEY})"
            )
        elif model_count >= self.max_evaluations_per_model:
            reason = (
                f"site refuses {msg.metadata.message_type}: it evaluates one model at most "
                f"{self.max_evaluations_per_model} times per run ({MAX_EVALUATIONS_PER_MODEL_KEY})"
            )
        else:
            counts[_RUN_COUNT] = run_count + 1
            counts[model] = model_count + 1
            context.state[EVALUATION_COUNTS] = counts
            return None
        return refusal(msg, reason)


# -- States that rest on a subset of a population's cases -----------------------------------
#: The attention inside the lesion (``common.attention``) rests on the cases that have a
#: lesion mask, a subset of the population's (cell's) cases: a site sends it only where that
#: subset holds at least k cases, or it would tell a few patients' values however large the
#: cell. Withheld states are sent as zeros (as a per-round record has them).
SUBSET_STATES = ("state.attention",)
#: The ``refused`` entry that names where a subset state was withheld.
SUBSET_REFUSAL = "attention_in_lesion"


def withhold_small_subsets(records: Mapping[str, dict[str, Any]], k: int) -> str | None:
    """Zero, in place, every subset state of ``records`` (``split`` or ``split/cell`` to
    record) resting on fewer than ``k`` cases (its first value), and those of every other cell
    of the same split and attribute (else the split's state minus the kept cells would give
    it back); the reason to send back, naming where, or ``None``."""
    small = {
        _subset_group(name)
        for name, record in records.items()
        for key in SUBSET_STATES
        if 0 < _first(record.get(key)) < k
    }
    withheld = []
    for name, record in records.items():
        if _subset_group(name) not in small:
            continue
        for key in SUBSET_STATES:
            values = record.get(key)
            if isinstance(values, list) and _first(values) > 0:
                record[key] = [0.0] * len(values)
                withheld.append(name)
    if not withheld:
        return None
    return f"withheld where fewer than k = {k} cases have a lesion mask: {', '.join(withheld)}"


def _subset_group(name: str) -> str:
    """``test/sex=F`` -> ``test/sex`` (the cells that partition a split); a split itself."""
    split, _, cell = name.partition("/")
    return f"{split}/{cell.partition('=')[0]}" if cell else split


def _first(values: Any) -> float:
    return float(values[0]) if isinstance(values, list) and values else 0.0


# -- Sample-level differential privacy: the site's budget --------------------------------------
#: ``context.state`` record of every DP-SGD step the site took in the run.
PRIVACY_LEDGER = "radfl.privacy-ledger"


def privacy_budget(
    msg: Message, context: Context, local_epochs: int | None = None
) -> tuple[PrivacyLedger | None, Message | None]:
    """This run's privacy ledger (``None`` without DP), or the refusal to send instead of
    training: the round would take the site past its ``dp-epsilon`` budget (the run's or its
    own, the smaller), or the site demands DP-SGD and the run trains without."""
    config = from_run_config(ClientConfig, context.run_config)
    policy = DisclosurePolicy.from_node_config(context.node_config)
    if not config.private:
        if policy.dp_epsilon > 0:
            return None, refusal(
                msg,
                f"site trains only with DP-SGD (its dp-epsilon = {policy.dp_epsilon:g}); the "
                "run has dp-noise-multiplier = 0",
            )
        return None, None
    record = context.state.get(PRIVACY_LEDGER)
    ledger = PrivacyLedger.from_record(record if isinstance(record, ConfigRecord) else None)
    budget = policy.privacy_budget(config.dp_epsilon)
    if budget > 0:
        from client.site import load_site

        n = len(load_site(context.node_config, config).train)
        steps = math.ceil(n / config.batch_size) * (local_epochs or config.local_epochs)
        rate = min(1.0, config.batch_size / n)
        spent = ledger.epsilon(config.dp_delta)
        planned = ledger.epsilon_after(config.dp_noise_multiplier, rate, steps, config.dp_delta)
        if planned > budget:
            return ledger, refusal(
                msg,
                f"site stops training: its privacy budget dp-epsilon = {budget:g} (delta "
                f"{config.dp_delta:g}) is spent up to {spent:.3f}, and this round would take "
                f"it to {planned:.3f}",
            )
    return ledger, None


def privacy_spent(ledger: PrivacyLedger | None, context: Context, train: Any) -> dict[str, float]:
    """Keep the ledger for the next rounds; the epsilon spent so far and the most studies of
    one patient in the training split ``train`` (group privacy: ``common.privacy``)."""
    if ledger is None:
        return {}
    config = from_run_config(ClientConfig, context.run_config)
    context.state[PRIVACY_LEDGER] = ConfigRecord(ledger.to_record())  # type: ignore[arg-type]
    studies = 1
    table = getattr(train, "attributes", None)
    if table is not None and mf.PATIENT_ID in table:
        studies = int(table[mf.PATIENT_ID].value_counts().max())
    return {
        keys.DP_EPSILON: ledger.epsilon(config.dp_delta),
        keys.DP_STUDIES_PER_PATIENT: studies,
    }


def model_digest(msg: Message) -> str:
    """SHA-256 of the weights a message carries (names and bytes), the model's identity."""
    digest = hashlib.sha256()
    record = msg.content.get(keys.ARRAYS)
    if isinstance(record, ArrayRecord):
        for name, array in record.items():
            digest.update(name.encode())
            digest.update(array.data)
    return digest.hexdigest()[:32]


def site_node_config(node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The node config, with ``RADFL_SIMULATION_NODE_CONFIG`` added for a virtual site."""
    config = dict(node_config)
    text = os.environ.get(SIMULATION_NODE_CONFIG_ENV)
    if text and "partition-id" in config and "data-path" not in config:
        try:
            extra = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{SIMULATION_NODE_CONFIG_ENV} is not JSON: {exc}") from None
        config = {**extra, **config}
    return config


def parse_node_config(text: str) -> dict[str, str | int | float | bool]:
    """``key=value`` pairs as ``flower-supernode --node-config`` takes them (TOML values)."""
    import tomllib

    try:
        values = tomllib.loads("\n".join(_split_pairs(text)))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--node-config {text!r}: {exc}") from None
    return dict(values)


def _split_pairs(text: str) -> list[str]:
    """``a=1 b="x y"`` as ``["a=1", 'b="x y"']`` (spaces inside quotes kept)."""
    pairs, current, quoted = [], "", False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == " " and not quoted:
            if current:
                pairs.append(current)
            current = ""
        else:
            current += char
    if current:
        pairs.append(current)
    return pairs


def _number(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key} must be a number, got {value!r}") from None


def _integer(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ConfigError(f"node config {key} must be a whole number, got {value!r}")
    return int(value)
