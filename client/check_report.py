"""The site check's report model: one ``Problem`` per row and file, and the ``CheckReport``
(problems, counts, JSON and text forms) that ``radfl site check`` prints and training stores.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client import data
from client.data import SiteDataError
from common import manifest as mf

REPORT_NAME = "radfl-check.json"
"""Default name of the JSON report, written in the site folder."""

_CHECK_VERSION = 2  # bump when the check changes, so stored results are not reused

_KNOWN_COLUMNS = {
    mf.IMAGE,
    mf.PATIENT_ID,
    mf.STUDY_ID,
    mf.LABEL,
    mf.LABELS,
    mf.MASK,
    mf.BOXES,
    mf.INSTANCE_MASK,
    *mf.SUBGROUP_COLUMNS,
}
_SEX_VALUES = ("F", "M", "O")
_PATIENT_LEVEL = (mf.SEX,)  # a patient has one value
_STUDY_LEVEL = (mf.AGE,)  # a study has one value
_MAX_MESSAGE = 300

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Problem:
    """One problem of a site: its CSV line (``None`` for the whole site), file, kind, message."""

    line: int | None
    file: str | None
    kind: str
    message: str

    def format(self) -> str:
        """``line 7: images/p3.dcm: truncated DICOM pixel data (...)``."""
        parts = [f"line {self.line}" if self.line is not None else None, self.file, self.message]
        return ": ".join(p for p in parts if p)


@dataclass
class CheckReport:
    """What ``check_site`` found: every problem, and class and subgroup counts of usable rows."""

    root: str
    task: str
    spatial_dims: int
    num_classes: int
    rows: int
    problems: list[Problem] = field(default_factory=list)
    class_counts: dict[str, int] = field(default_factory=dict)
    subgroup_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No problem at all."""
        return not self.problems

    @property
    def bad_lines(self) -> set[int]:
        """CSV lines with at least one problem."""
        return {p.line for p in self.problems if p.line is not None}

    @property
    def site_problems(self) -> list[Problem]:
        """Problems of the whole site (no line): no row can be used."""
        return [p for p in self.problems if p.line is None]

    @property
    def usable_rows(self) -> int:
        return 0 if self.site_problems else self.rows - len(self.bad_lines)

    def problem_lines(self) -> list[str]:
        """One line of text per problem, in CSV order."""
        ordered = sorted(self.problems, key=lambda p: (p.line is not None, p.line or 0))
        return [p.format() for p in ordered]

    def format_text(self) -> str:
        """The human-readable report: a summary, every problem, class and subgroup counts."""
        dims = f"{self.spatial_dims}D"
        out = [
            f"site check of {self.root} (task {self.task}, {dims}, {self.num_classes} classes): "
            f"{self.rows} rows, {self.usable_rows} usable, {len(self.problems)} problem(s)"
        ]
        out += self.problem_lines()
        if self.class_counts:
            out.append("class counts (usable rows):")
            width = max(len(k) for k in self.class_counts)
            out += [f"  class {k:>{width}}  {n}" for k, n in self.class_counts.items()]
        if self.subgroup_counts:
            out.append("subgroup counts (usable rows):")
            width = max(len(k) for k in self.subgroup_counts)
            for column, counts in self.subgroup_counts.items():
                values = ", ".join(f"{value} {n}" for value, n in counts.items()) or "none"
                out.append(f"  {column:<{width}}  {values}")
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "task": self.task,
            "spatial_dims": self.spatial_dims,
            "num_classes": self.num_classes,
            "rows": self.rows,
            "usable_rows": self.usable_rows,
            "ok": self.ok,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "class_counts": self.class_counts,
            "subgroup_counts": self.subgroup_counts,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write_json(self, path: Path) -> None:
        """Write the report; readers in other processes never see a half-written file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(self.to_json() + "\n")
        os.replace(partial, path)

    @classmethod
    def from_json(cls, text: str) -> CheckReport:
        raw = json.loads(text)
        return cls(
            root=raw["root"],
            task=raw["task"],
            spatial_dims=int(raw["spatial_dims"]),
            num_classes=int(raw["num_classes"]),
            rows=int(raw["rows"]),
            problems=[Problem(**p) for p in raw["problems"]],
            class_counts={str(k): int(v) for k, v in raw["class_counts"].items()},
            subgroup_counts={
                str(c): {str(k): int(v) for k, v in counts.items()}
                for c, counts in raw["subgroup_counts"].items()
            },
        )


def _list(values: Sequence[int]) -> str:
    return ", ".join(str(v) for v in values)


def _short(exc: BaseException) -> str:
    """An exception as one line of bounded length (MONAI's reader errors span many lines)."""
    exc = data.transform_error_cause(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _site_message(exc: SiteDataError) -> str:
    # read_manifest names the manifest's full path; the Problem's file already says it.
    return str(exc).split(": ", 1)[-1]
