"""Patient subgroups for the bias report, and the small-cell rule that protects them.

The run config declares which attributes define subgroups (``subgroups = "sex,age,manufacturer"``)
and the age bands (``age-bands = "40,65"`` gives ``<40``, ``40-64`` and ``>=65``). A site
assigns each of its images to one *cell* per attribute (``sex=F``, ``age=40-64``); a missing
value falls into the ``unknown`` cell of that attribute, so missingness itself is reported.

Small cells: a cell holding fewer than ``min-cell-size`` distinct patients at a site is
suppressed *at that site*: the site sends neither its metric states nor its size, only the
fact that it suppressed the cell. The pooled value of a cell then rests on the sites that did
send it, and the report names the sites that did not. ``site`` as an attribute needs nothing
from the sites: the server already holds each site's states.

Complementary suppression (:func:`withheld_cells`): the cells of one attribute partition the
split, and the split's overall states are sent too, so overall minus the sent cells is the sum
of the withheld ones. One withheld cell would be recovered exactly by that subtraction; so
whenever an attribute withholds a cell, it withholds the smallest sent cells with it until the
withheld cells are at least two and together hold at least ``min-cell-size`` patients (or the
whole attribute is withheld). A last check works on the rows themselves: a withheld cell whose
rows are any linear combination of the rows of sent cells and of the whole split (across
attributes, e.g. ``age>=80`` minus ``sex=M`` within it) could be computed from what was sent;
if one is, every cell of the split is withheld.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from common import manifest as mf
from common.errors import ConfigError

SITE_ATTRIBUTE = "site"
UNKNOWN = "unknown"
#: Attributes whose values are read from a column of the same name (any manifest column works).
AGE_ATTRIBUTE = mf.AGE


@dataclass(frozen=True)
class SubgroupSpec:
    """Which subgroups a run reports and how small a cell may be.

    Attributes
    ----------
    attributes : tuple of str
        Manifest columns that define subgroups (``site`` is pooled by the server instead).
    age_bands : tuple of int
        Increasing band edges in years for the ``age`` attribute.
    min_cell_size : int
        Cells with fewer distinct patients than this are suppressed at the site.
    """

    attributes: tuple[str, ...]
    age_bands: tuple[int, ...] = (40, 65)
    min_cell_size: int = 10

    def __post_init__(self) -> None:
        if self.min_cell_size < 1:
            raise ConfigError(f"min-cell-size must be >= 1, got {self.min_cell_size}")
        if list(self.age_bands) != sorted(set(self.age_bands)):
            raise ConfigError(f"age-bands must increase strictly, got {list(self.age_bands)}")
        if len(set(self.attributes)) != len(self.attributes):
            raise ConfigError(f"subgroups lists an attribute twice: {list(self.attributes)}")

    @classmethod
    def parse(cls, subgroups: str, age_bands: str, min_cell_size: int) -> SubgroupSpec:
        """From the run-config strings ``"sex,age"`` and ``"40,65"``."""
        attributes = tuple(part.strip() for part in subgroups.split(",") if part.strip())
        try:
            bands = tuple(int(part) for part in age_bands.split(",") if part.strip())
        except ValueError:
            raise ConfigError(
                f"age-bands must be comma-separated whole years, got {age_bands!r}"
            ) from None
        return cls(attributes, bands, min_cell_size)

    @property
    def site_attributes(self) -> tuple[str, ...]:
        """The attributes a site evaluates (all but ``site``)."""
        return tuple(a for a in self.attributes if a != SITE_ATTRIBUTE)

    def age_band(self, age: object) -> str:
        """The band label of an age in years; ``unknown`` when missing or unreadable."""
        try:
            years = float(str(age).strip().rstrip("Yy"))
        except ValueError:
            return UNKNOWN
        if not np.isfinite(years):
            return UNKNOWN
        edges = self.age_bands
        if not edges:
            return "all"
        if years < edges[0]:
            return f"<{edges[0]}"
        for low, high in zip(edges, edges[1:], strict=False):
            if years < high:
                return f"{low}-{high - 1}"
        return f">={edges[-1]}"

    def values(self, table: pd.DataFrame, attribute: str) -> pd.Series:
        """Each row's cell value for ``attribute`` (``unknown`` where missing)."""
        if attribute not in table.columns:
            return pd.Series(UNKNOWN, index=table.index, dtype=object)
        column = table[attribute]
        if attribute == AGE_ATTRIBUTE:
            return column.map(self.age_band).astype(object)
        text = column.astype(object).map(_clean)
        return text

    def cells(self, table: pd.DataFrame) -> dict[tuple[str, str], np.ndarray]:
        """Boolean row masks of every cell, keyed by ``(attribute, value)``, sorted."""
        cells: dict[tuple[str, str], np.ndarray] = {}
        for attribute in self.site_attributes:
            values = self.values(table, attribute)
            for value in sorted(set(values)):
                cells[(attribute, value)] = (values == value).to_numpy()
        return cells

    def is_small(self, patients: int) -> bool:
        return patients < self.min_cell_size


Cell = tuple[str, str]


def withheld_cells(
    masks: Mapping[Cell, np.ndarray], patients: Mapping[Cell, int], min_cell_size: int
) -> set[Cell]:
    """The cells a site must not send: the small ones, and enough others that none of the
    small ones can be computed from what is sent (see the module's *Complementary
    suppression*).

    Parameters
    ----------
    masks : dict of (attribute, value) to numpy.ndarray
        Boolean row masks of every cell (:meth:`SubgroupSpec.cells`); the cells of one
        attribute partition the rows.
    patients : dict of (attribute, value) to int
        Distinct patients per cell.
    min_cell_size : int
        k: cells with fewer patients are suppressed.

    Returns
    -------
    set of (attribute, value)
        Every cell to withhold; the others may be sent next to the overall states.
    """
    withheld: set[Cell] = set()
    by_attribute: dict[str, list[Cell]] = {}
    for cell in masks:
        by_attribute.setdefault(cell[0], []).append(cell)
    for cells in by_attribute.values():
        # Smallest first; ties by value, so that the choice does not depend on dict order.
        ordered = sorted(cells, key=lambda c: (patients[c], c[1]))
        hidden = [c for c in ordered if patients[c] < min_cell_size]
        if not hidden:
            continue
        sent = [c for c in ordered if c not in hidden]
        while sent and (len(hidden) < 2 or sum(patients[c] for c in hidden) < min_cell_size):
            hidden.append(sent.pop(0))
        withheld.update(hidden)
    if withheld and derivable_cells(masks, withheld):
        return set(masks)
    return withheld


def derivable_cells(masks: Mapping[Cell, np.ndarray], withheld: set[Cell]) -> list[Cell]:
    """Withheld cells whose rows are a linear combination of the rows of the sent cells and
    of the whole split: their summed states could be computed from what is sent."""
    sent = [c for c in masks if c not in withheld]
    hidden = sorted(c for c in withheld if c in masks)
    if not hidden:
        return []
    rows = len(next(iter(masks.values())))
    basis = np.column_stack([np.ones(rows)] + [masks[c].astype(np.float64) for c in sent])
    out = []
    for cell in hidden:
        target = masks[cell].astype(np.float64)
        coefficients, *_ = np.linalg.lstsq(basis, target, rcond=None)
        if np.abs(basis @ coefficients - target).max() < 1e-6:
            out.append(cell)
    return out


def cell_name(attribute: str, value: str) -> str:
    """``sex=F``: how a cell is named in messages, MLflow and reports."""
    return f"{attribute}={value}"


def parse_cell_name(name: str) -> tuple[str, str]:
    attribute, sep, value = name.partition("=")
    if not sep:
        raise ValueError(f"not a subgroup cell name: {name!r}")
    return attribute, value


def _clean(value: object) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return UNKNOWN
    text = str(value).strip()
    return text if text and text.lower() != "nan" else UNKNOWN
