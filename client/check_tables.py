"""The site check across rows: duplicates, patients and studies whose rows disagree, and the
class and subgroup counts of the usable rows.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Iterable

import numpy as np
import pandas as pd

from client import data
from client.check_report import _KNOWN_COLUMNS, _PATIENT_LEVEL, _STUDY_LEVEL, Problem, _list
from client.check_rows import _age_years, age_band
from common import manifest as mf


def _duplicate_problems(table: pd.DataFrame) -> list[Problem]:
    problems = []
    seen_rows: dict[tuple[str, ...], int] = {}
    seen_images: dict[str, int] = {}
    for line, row in table.iterrows():
        cells = tuple(row.tolist())
        image = row[mf.IMAGE]
        if cells in seen_rows:
            problems.append(
                Problem(
                    int(line),
                    image or None,
                    "duplicate",
                    f"duplicate of line {seen_rows[cells]} (every cell equal)",
                )
            )
            continue
        seen_rows[cells] = int(line)
        if not image:
            continue
        key = os.path.normpath(image.replace("\\", "/"))
        if key in seen_images:
            problems.append(
                Problem(
                    int(line), image, "duplicate", f"image also listed on line {seen_images[key]}"
                )
            )
        else:
            seen_images[key] = int(line)
    return problems


def _conflict_problems(table: pd.DataFrame) -> list[Problem]:
    problems = []
    for columns, keys, what in (
        (_PATIENT_LEVEL, [mf.PATIENT_ID], "patient"),
        (_STUDY_LEVEL, [mf.PATIENT_ID, mf.STUDY_ID], "study"),
    ):
        for column in columns:
            if column not in table.columns:
                continue
            for key, group in table.groupby(keys, sort=False):
                values: dict[str, list[int]] = defaultdict(list)
                for line, value in group[column].items():
                    if value:
                        values[_canonical(column, value)].append(int(line))
                if len(values) < 2:
                    continue
                name = key[-1] if isinstance(key, tuple) else key
                listing = "; ".join(f"{v} on line(s) {_list(lines)}" for v, lines in values.items())
                message = f"{what} {name} has conflicting {column}: {listing}"
                for line in sorted(line for lines in values.values() for line in lines):
                    problems.append(
                        Problem(
                            line, table.at[line, mf.IMAGE] or None, "conflicting-subgroup", message
                        )
                    )
    return problems


def _canonical(column: str, value: str) -> str:
    if column == mf.AGE:
        years = _age_years(value)
        return value if years is None else f"{years:g}"
    return value.upper() if column in (mf.SEX, mf.MODALITY) else value


# -- counts ---------------------------------------------------------------------------------


def _class_counts(table: pd.DataFrame, task: str, num_classes: int) -> dict[str, int]:
    kind = data.site_task(task)
    if not kind.label_is_target:
        return {}
    counts: Counter[int] = Counter()
    for value in table[kind.label_column]:
        if not value:  # an unlabelled study (pseudo-labelling)
            continue
        target = kind.parse_label(value, num_classes)
        # A class, or one flag per finding (multi-label): count the positives of each.
        counts.update([target] if isinstance(target, int) else np.flatnonzero(target).tolist())
    return {str(c): counts.get(c, 0) for c in range(num_classes)}


def _subgroup_counts(table: pd.DataFrame) -> dict[str, dict[str, int]]:
    columns = [*mf.SUBGROUP_COLUMNS, *(c for c in table.columns if c not in _KNOWN_COLUMNS)]
    counts: dict[str, dict[str, int]] = {}
    for column in columns:
        if column not in table.columns:
            continue
        if column == mf.AGE:
            values: Iterable[str] = (age_band(v) for v in table[column])
            order = ["<40", "40-59", "60+", "unknown"]
        else:
            values = (v or "unknown" for v in table[column])
            order = []
        counter = Counter(values)
        keys = [k for k in order if k in counter] + sorted(k for k in counter if k not in order)
        counts[column] = {k: counter[k] for k in keys}
    return counts
