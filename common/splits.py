"""Patient-disjoint train/validation/test splits that never move a patient.

Each patient is placed by a hash of ``(seed, patient_id)`` mapped to ``[0, 1)``: below
``train`` goes to training, below ``train + validation`` to validation, the rest to test. All
studies of a patient (follow-ups included) land in the same split, every rerun and every round
gives the same split, and adding rows never moves a patient already placed: a new patient is
placed by its own hash, a new study joins its patient.

Stratification: the hash is independent of the label, so each split's class mix equals the
site's in expectation (a stratified random split), and ``split_report`` shows the counts. A rank-
based exactly stratified split would move patients across splits whenever rows are added, which
would leak test patients into training between reruns; stability wins here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from common.errors import ConfigError

TRAIN = "train"
VALIDATION = "validation"
TEST = "test"
SPLITS = (TRAIN, VALIDATION, TEST)


@dataclass(frozen=True)
class SplitFractions:
    """Shares of patients per split; they must sum to 1."""

    train: float = 0.7
    validation: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        values = (self.train, self.validation, self.test)
        if any(v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-9:
            raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {values}")


def patient_position(patient_id: str, seed: int) -> float:
    """A patient's fixed position in ``[0, 1)`` for this seed."""
    digest = hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    patient_ids: Sequence[str] | pd.Series, *, seed: int, fractions: SplitFractions | None = None
) -> pd.Series:
    """The split (``train``, ``validation`` or ``test``) of each row, by its patient."""
    fractions = fractions or SplitFractions()
    ids = pd.Series(list(patient_ids), dtype="string")
    if ids.isna().any() or (ids.str.strip() == "").any():
        rows = [int(i) for i in ids.index[ids.isna() | (ids.fillna("").str.strip() == "")]]
        raise ConfigError(f"empty patient_id in rows {rows}")
    positions = {p: patient_position(p, seed) for p in ids.unique()}
    cut_train = fractions.train
    cut_validation = fractions.train + fractions.validation

    def place(patient: str) -> str:
        u = positions[patient]
        return TRAIN if u < cut_train else VALIDATION if u < cut_validation else TEST

    return ids.map(place).astype(str)


def split_report(splits: pd.Series, labels: pd.Series) -> pd.DataFrame:
    """Rows per split and label (a table for the site's check output)."""
    table = pd.crosstab(splits, labels).reindex(index=list(SPLITS), fill_value=0)
    table.index.name = "split"
    return table
