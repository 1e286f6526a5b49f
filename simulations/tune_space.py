"""What ``radfl tune`` searches: each run-config key's range, overrides of it, and the TOML file
the best trial is written to (one that ``radfl simulate --config FILE`` reads back).

The default ranges (``--range KEY=LOW:HIGH`` or ``--range batch-size=8,16`` overrides one):

============================  ===================  ==========================================
key                           range                sampled
============================  ===================  ==========================================
``learning-rate``             1e-4 .. 1e-2         log-uniform
``local-epochs``              1 .. 3               integers
``batch-size``                8, 16, 32            one of
``proximal-mu``               1e-4 .. 1            log-uniform; only under ``fedprox``
``server-learning-rate``      1e-3 .. 1            log-uniform; only under ``fedadam``/``fedyogi``
============================  ===================  ==========================================

A key the run config already fixes (``--config`` or ``--set``) is not searched, and neither is
one the run's strategy does not read (FedAvg has no proximal term): a trial spent on it would
change nothing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from common.errors import ConfigError


class Suggester(Protocol):
    """The part of ``optuna.Trial`` a parameter draws its value from."""

    def suggest_float(self, name: str, low: float, high: float, *, log: bool = False) -> float: ...

    def suggest_int(self, name: str, low: int, high: int) -> int: ...

    def suggest_categorical(self, name: str, choices: Sequence[int]) -> int: ...


@dataclasses.dataclass(frozen=True)
class Parameter:
    """One run-config key and the values a trial may give it.

    Either ``choices`` (one of them), or ``low``..``high`` (integers with ``integer``, else
    floats, log-uniform with ``log``). ``strategies``: the strategies that read the key (empty:
    all of them).
    """

    key: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: tuple[int, ...] = ()
    strategies: tuple[str, ...] = ()

    def suggest(self, trial: Suggester) -> float | int:
        if self.choices:
            return trial.suggest_categorical(self.key, self.choices)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high))
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)

    def describe(self) -> str:
        if self.choices:
            return f"{self.key} in {{{', '.join(str(c) for c in self.choices)}}}"
        scale = "log" if self.log else "integers" if self.integer else "uniform"
        return f"{self.key} {self.low:g}..{self.high:g} ({scale})"


DEFAULT_SPACE: tuple[Parameter, ...] = (
    Parameter("learning-rate", 1e-4, 1e-2, log=True),
    Parameter("local-epochs", 1, 3, integer=True),
    Parameter("batch-size", choices=(8, 16, 32)),
    # FedProx's mu (server/strategies.py passes it to FedProx only; sites add the term).
    Parameter("proximal-mu", 1e-4, 1.0, log=True, strategies=("fedprox",)),
    # FedAdam's and FedYogi's eta; FedAvgM's server learning rate is fixed at 1.0 there.
    Parameter("server-learning-rate", 1e-3, 1.0, log=True, strategies=("fedadam", "fedyogi")),
)


def parse_ranges(
    items: Iterable[str], space: Sequence[Parameter] = DEFAULT_SPACE
) -> tuple[Parameter, ...]:
    """``space`` with each ``KEY=LOW:HIGH`` (or ``KEY=A,B,C`` for a key of choices) applied.

    Raises
    ------
    ConfigError
        Naming the ``--range`` item: an unknown key, a malformed or empty range, ``LOW`` not
        below ``HIGH``, a log-scale bound at or below 0, a fraction for an integer key, or a
        choice below 1.
    """
    by_key = {p.key: p for p in space}
    for item in items:
        key, sep, text = (part.strip() for part in item.partition("="))
        where = f"--range {item!r}"
        if not sep or not text:
            raise ConfigError(f"{where}: expected KEY=LOW:HIGH (or KEY=A,B,C for batch-size)")
        if key not in by_key:
            raise ConfigError(
                f"{where}: {key!r} is not searched; searched keys: {', '.join(by_key)}"
            )
        by_key[key] = _parsed(by_key[key], text, where)
    return tuple(by_key.values())


def _parsed(parameter: Parameter, text: str, where: str) -> Parameter:
    if parameter.choices:
        try:
            choices = tuple(int(part) for part in text.split(","))
        except ValueError:
            raise ConfigError(
                f"{where}: {parameter.key} takes whole numbers, e.g. 8,16,32"
            ) from None
        if any(c < 1 for c in choices):
            raise ConfigError(f"{where}: every {parameter.key} must be at least 1")
        return dataclasses.replace(parameter, choices=tuple(dict.fromkeys(choices)))
    low_text, sep, high_text = text.partition(":")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise ConfigError(f"{where}: expected LOW:HIGH numbers, e.g. 1e-4:1e-2") from None
    if not sep or not (math.isfinite(low) and math.isfinite(high)):
        raise ConfigError(f"{where}: expected LOW:HIGH numbers, e.g. 1e-4:1e-2")
    if low >= high:
        raise ConfigError(
            f"{where}: LOW {low:g} must be below HIGH {high:g} (to fix the value, "
            f"--set {parameter.key}=VALUE)"
        )
    if parameter.log and low <= 0:
        raise ConfigError(f"{where}: {parameter.key} is searched on a log scale; LOW must be > 0")
    if parameter.integer and (low != int(low) or high != int(high) or low < 1):
        raise ConfigError(f"{where}: {parameter.key} takes whole numbers of at least 1")
    return dataclasses.replace(parameter, low=low, high=high)


def searched(
    space: Sequence[Parameter], *, strategy: str, fixed: Iterable[str]
) -> tuple[tuple[Parameter, ...], dict[str, str]]:
    """The parameters a trial draws under ``strategy``, and why each other one is not drawn."""
    fixed = set(fixed)
    drawn: list[Parameter] = []
    left: dict[str, str] = {}
    for parameter in space:
        if parameter.key in fixed:
            left[parameter.key] = "fixed by --config/--set"
        elif parameter.strategies and strategy not in parameter.strategies:
            readers = " and ".join(parameter.strategies)
            left[parameter.key] = f"not used by {strategy}; used by {readers}"
        else:
            drawn.append(parameter)
    return tuple(drawn), left


def write_toml(path: Path, values: Mapping[str, Any], comments: Sequence[str] = ()) -> None:
    """Write ``values`` as a ``[config]`` table ``radfl simulate --config`` reads, with
    ``comments`` above it."""
    lines = [f"# {line}" for line in comments]
    lines.append("[config]")
    lines += [f"{key} = {_toml_value(key, value)}" for key, value in values.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _toml_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr round-trips exactly; TOML spells the non-finite ones inf and nan as Python does.
        return repr(value)
    if isinstance(value, str):
        # JSON's escapes are a subset of TOML's basic-string escapes.
        return json.dumps(value)
    raise ConfigError(f"run-config key {key}: cannot write {value!r} to TOML")
