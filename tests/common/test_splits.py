import pandas as pd
import pytest

from common.errors import ConfigError
from common.splits import SplitFractions, assign_splits, split_report


def _manifest(num_patients: int, studies_of_every_third: int = 3, offset: int = 0) -> pd.DataFrame:
    rows = []
    for p in range(offset, offset + num_patients):
        studies = studies_of_every_third if p % 3 == 0 else 1
        for s in range(studies):
            rows.append(
                {"patient_id": f"P{p:05d}", "study_id": f"P{p:05d}-S{s}", "label": p % 4 == 0}
            )
    return pd.DataFrame(rows)


def test_no_patient_in_two_splits_with_follow_up_studies():
    manifest = _manifest(600)
    manifest["split"] = assign_splits(manifest["patient_id"], seed=1)
    per_patient = manifest.groupby("patient_id")["split"].nunique()
    assert (per_patient == 1).all()
    assert manifest.groupby("patient_id").size().max() == 3  # multi-visit patients exist


def test_split_is_deterministic_and_depends_on_seed():
    ids = _manifest(300)["patient_id"]
    assert assign_splits(ids, seed=5).equals(assign_splits(ids, seed=5))
    assert not assign_splits(ids, seed=5).equals(assign_splits(ids, seed=6))


def test_adding_rows_never_moves_a_placed_patient():
    before = _manifest(400)
    before_splits = dict(
        zip(before["study_id"], assign_splits(before["patient_id"], seed=2), strict=False)
    )
    # New patients, and new follow-up studies of existing patients, shuffled in.
    added = pd.concat(
        [
            before,
            _manifest(200, offset=400),
            pd.DataFrame(
                {"patient_id": ["P00001", "P00002"], "study_id": ["P00001-new", "P00002-new"]}
            ),
        ]
    ).sample(frac=1.0, random_state=0)
    after = dict(zip(added["study_id"], assign_splits(added["patient_id"], seed=2), strict=False))
    assert all(after[study] == split for study, split in before_splits.items())
    assert after["P00001-new"] == before_splits["P00001-S0"]


def test_fractions_and_label_mix_are_close_to_targets():
    manifest = _manifest(3000, studies_of_every_third=1)
    splits = assign_splits(manifest["patient_id"], seed=0, fractions=SplitFractions(0.6, 0.2, 0.2))
    shares = splits.value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.6, abs=0.03)
    assert shares["validation"] == pytest.approx(0.2, abs=0.03)
    report = split_report(splits, manifest["label"])
    prevalence = report[True] / report.sum(axis=1)
    assert (prevalence - manifest["label"].mean()).abs().max() < 0.04


def test_bad_inputs_raise():
    with pytest.raises(ConfigError, match="sum to 1"):
        SplitFractions(0.5, 0.5, 0.5)
    with pytest.raises(ConfigError, match="empty patient_id"):
        assign_splits(["a", "", "b"], seed=0)
