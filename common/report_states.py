"""What the final evaluation collects: summed metric states per split, site and cell.

The server builds :class:`EvaluationStates` from the sites' final replies and stores it as
JSON in MLflow; ``common.report.build_report`` turns it into tables. Each split knows its task
(a :class:`common.tasks.Task` class; JSON stores its registered name), and the task its states.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.splits import TEST, VALIDATION
from common.states import SummableStates
from common.subgroups import parse_cell_name
from common.tasks import Task, task_class

SPLITS = (VALIDATION, TEST)


@dataclass
class SplitStates:
    """Summed metric states of one split (validation or test) of the final model.

    Attributes
    ----------
    num_classes : int
    task : Task, Task class or str
        The task whose metric states the split holds; kept as its class (a name is looked up
        in the registry).
    sites : dict of str to states
        Each site's own states over the split.
    cells : dict of str to dict of str to states
        ``cells[cell][site]``: the states a site sent for a subgroup cell (``sex=F``).
    patients : dict of str to dict of str to int
        ``patients[cell][site]``: distinct patients behind those states (each >= k).
    suppressed : dict of str to list of str
        ``suppressed[cell]``: sites that held fewer than k patients in the cell and sent
        nothing for it.
    """

    num_classes: int
    task: type[Task] | Task | str = "classification"
    sites: dict[str, Any] = field(default_factory=dict)
    cells: dict[str, dict[str, Any]] = field(default_factory=dict)
    patients: dict[str, dict[str, int]] = field(default_factory=dict)
    suppressed: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task = self.task_type

    @property
    def task_type(self) -> type[Task]:
        """The task class (resolved from its name or object when the split was built so)."""
        if isinstance(self.task, str):
            return task_class(self.task)
        return self.task if isinstance(self.task, type) else type(self.task)

    def empty(self) -> SummableStates:
        """Empty states of this split's task."""
        return self.task_type.empty_states(self.num_classes)

    def states(self, record: Mapping[str, Any]) -> SummableStates:
        """States read from one site's record."""
        states = self.empty()
        states.add_record(record)
        return states

    def sum(self, parts: Iterable[SummableStates]) -> SummableStates:
        """The sum of ``parts`` (empty states when there is none)."""
        total = self.empty()
        for part in parts:
            total.merge(part)
        return total

    def add_site(
        self,
        site: str,
        overall: Mapping[str, Any],
        cells: Mapping[str, Mapping[str, Any]],
        patients: Mapping[str, int],
        suppressed: Iterable[str],
    ) -> None:
        """Add one site's reply: overall states, per-cell states and the suppressed cells."""
        if site in self.sites:
            raise ValueError(f"site {site!r} replied twice")
        self.sites[site] = self.states(overall)
        for cell, record in cells.items():
            parse_cell_name(cell)
            self.cells.setdefault(cell, {})[site] = self.states(record)
            self.patients.setdefault(cell, {})[site] = int(patients[cell])
        for cell in suppressed:
            self.suppressed.setdefault(cell, []).append(site)

    def pooled(self, sites: Iterable[str] | None = None) -> SummableStates:
        """States summed over ``sites`` (all sites by default)."""
        chosen = self.sites if sites is None else {s: self.sites[s] for s in sites}
        return self.sum(chosen.values())

    def pooled_cell(self, cell: str, sites: Iterable[str]) -> tuple[SummableStates, int]:
        """A cell's states and patients summed over those of ``sites`` that sent it."""
        wanted = set(sites)
        sent = {s: v for s, v in self.cells.get(cell, {}).items() if s in wanted}
        patients = sum(self.patients.get(cell, {}).get(s, 0) for s in sent)
        return self.sum(sent.values()), patients

    def to_json(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "task": self.task_type.name,
            "sites": {s: v.to_record() for s, v in self.sites.items()},
            "cells": {c: {s: v.to_record() for s, v in by.items()} for c, by in self.cells.items()},
            "patients": self.patients,
            "suppressed": self.suppressed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SplitStates:
        split = cls(int(data["num_classes"]), str(data.get("task", "classification")))
        return cls(
            split.num_classes,
            split.task,
            sites={s: split.states(r) for s, r in data["sites"].items()},
            cells={
                c: {s: split.states(r) for s, r in by.items()} for c, by in data["cells"].items()
            },
            patients={c: {s: int(n) for s, n in by.items()} for c, by in data["patients"].items()},
            suppressed={c: list(sites) for c, sites in data["suppressed"].items()},
        )


@dataclass
class EvaluationStates:
    """What the final evaluation collected: both splits, and facts about the run.

    Attributes
    ----------
    splits : dict of str to SplitStates
        ``validation`` and ``test`` states of the final model.
    external_sites : list of str
        Sites left out of training; excluded from pooled values, reported on their own.
    site_summary : dict of str to dict
        Per site: images per split and the like, as the site declared them.
    run : dict
        Run facts for the model card (run id, model, strategy, rounds, selected round, ...).
    settings : dict
        ``threshold_method``, ``target_sensitivity``, ``confidence_level``, ``min_cell_size``,
        ``subgroups``.
    cross_site : dict of str to dict of str to float, optional
        ``cross_site[model][data_site]``: the task's primary validation metric of each site's
        local-only model (and the federated one) on every site.
    """

    splits: dict[str, SplitStates]
    external_sites: list[str]
    site_summary: dict[str, dict[str, Any]]
    run: dict[str, Any]
    settings: dict[str, Any]
    cross_site: dict[str, dict[str, float]] | None = None

    @property
    def internal_sites(self) -> list[str]:
        return sorted(s for s in self.splits[TEST].sites if s not in self.external_sites)

    def to_json(self) -> dict[str, Any]:
        return {
            "splits": {name: split.to_json() for name, split in self.splits.items()},
            "external_sites": self.external_sites,
            "site_summary": self.site_summary,
            "run": self.run,
            "settings": self.settings,
            "cross_site": self.cross_site,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvaluationStates:
        return cls(
            splits={name: SplitStates.from_json(s) for name, s in data["splits"].items()},
            external_sites=list(data["external_sites"]),
            site_summary=dict(data["site_summary"]),
            run=dict(data["run"]),
            settings=dict(data["settings"]),
            cross_site=data.get("cross_site"),
        )
