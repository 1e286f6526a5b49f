import numpy as np
import pandas as pd
import pytest

from common.config import ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.subgroups import SubgroupSpec, cell_name, parse_cell_name


def test_age_bands_label_every_age_and_missing_values_are_unknown():
    spec = SubgroupSpec(("age",), age_bands=(40, 65))
    assert [spec.age_band(a) for a in (39, 40, 64.9, 65, 90)] == [
        "<40",
        "40-64",
        "40-64",
        ">=65",
        ">=65",
    ]
    assert spec.age_band("063Y") == "40-64"  # DICOM PatientAge
    assert spec.age_band(None) == spec.age_band("") == spec.age_band(float("nan")) == "unknown"


def test_cells_cover_each_attribute_and_report_missing_as_unknown():
    spec = SubgroupSpec(("sex", "manufacturer", "site"), min_cell_size=2)
    table = pd.DataFrame({"patient_id": ["a", "b", "c"], "sex": ["F", None, "M"]})
    cells = spec.cells(table)
    assert sorted(cells) == [
        ("manufacturer", "unknown"),
        ("sex", "F"),
        ("sex", "M"),
        ("sex", "unknown"),
    ]
    assert cells[("sex", "unknown")].tolist() == [False, True, False]
    assert cells[("manufacturer", "unknown")].all()


def test_cell_names_round_trip():
    assert parse_cell_name(cell_name("age", ">=65")) == ("age", ">=65")
    with pytest.raises(ValueError, match="not a subgroup cell"):
        parse_cell_name("sex")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("age-bands", "65,40", "increase"),
        ("age-bands", "forty", "whole years"),
        ("min-cell-size", 0, "min-cell-size"),
        ("subgroups", "sex,sex", "twice"),
        ("threshold-method", "max-f1", "threshold-method"),
        ("target-sensitivity", 1.5, "target-sensitivity"),
        ("confidence-level", 1.0, "confidence-level"),
        ("final-model", "first", "final-model"),
    ],
)
def test_bad_evaluation_settings_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        from_run_config(ServerConfig, {**default_run_config(), key: value})


def test_defaults_declare_sex_age_manufacturer_and_site_with_k_10():
    spec = from_run_config(ServerConfig, default_run_config()).subgroup_spec
    assert spec.attributes == ("sex", "age", "manufacturer", "site")
    assert spec.site_attributes == ("sex", "age", "manufacturer")
    assert spec.min_cell_size == 10
    assert spec.is_small(9) and not spec.is_small(10)
    assert np.array_equal(spec.age_bands, (40, 65))


# ------------------------------------------------------------ complementary suppression
def _cell_states(table: pd.DataFrame, spec: SubgroupSpec, seed: int = 0):
    """Summed classification states per cell and overall, from one random score per row."""
    from common.metrics import ClassificationStates

    rng = np.random.default_rng(seed)
    target = rng.integers(0, 2, len(table))
    score = rng.random(len(table))
    probs = np.stack([1 - score, score], 1)

    def states(mask: np.ndarray) -> np.ndarray:
        summed = ClassificationStates(2)
        if mask.any():
            summed.update(probs[mask], target[mask])
        # The integer states: histogram and count (what a subtraction would recover exactly).
        return np.concatenate([summed.histogram.reshape(-1), [summed.count]])

    masks = spec.cells(table)
    cells = {cell: states(mask) for cell, mask in masks.items()}
    return masks, cells, states(np.ones(len(table), dtype=bool))


def _subtraction_attack(overall, published, hidden_truth) -> list:
    """Every combination of the overall and the published cells with coefficients -1, 0 or 1
    (the subtraction overall - cells, and differences across attributes): the hidden cells it
    reproduces exactly."""
    import itertools

    vectors = np.stack([overall, *published.values()]).astype(np.int64)
    # An exact integer projection keeps the search small; matches are checked in full.
    weights = np.random.default_rng(1).integers(-(2**20), 2**20, vectors.shape[1])
    projected = vectors @ weights
    targets = {cell: truth @ weights for cell, truth in hidden_truth.items()}
    recovered = set()
    for coefficients in itertools.product((-1, 0, 1), repeat=len(vectors)):
        value = np.dot(coefficients, projected)
        for cell, target in targets.items():
            if value == target and np.array_equal(
                np.asarray(coefficients) @ vectors, hidden_truth[cell]
            ):
                recovered.add(cell)
    return sorted(recovered)


def _table(sex: list[str], age: list[int], **more: list[str]) -> pd.DataFrame:
    return pd.DataFrame(
        {"patient_id": [f"p{i}" for i in range(len(sex))], "sex": sex, "age": age, **more}
    )


def test_complementary_suppression_leaves_no_small_cell_to_subtraction_by_hand():
    from common.subgroups import withheld_cells

    rng = np.random.default_rng(3)
    sex = ["F"] * 30 + ["M"] * 27 + ["O"] * 3
    age = [30] * 20 + [50] * 36 + [70] * 4
    order = rng.permutation(60)
    table = _table([sex[i] for i in order], [age[i] for i in order])
    spec = SubgroupSpec(("sex", "age"), age_bands=(40, 65), min_cell_size=5)
    masks, truth, overall = _cell_states(table, spec)
    patients = {cell: int(mask.sum()) for cell, mask in masks.items()}

    # Suppressing only the small cells: the subtraction gives both back exactly.
    small = {cell for cell, n in patients.items() if n < 5}
    assert small == {("sex", "O"), ("age", ">=65")}
    published = {c: v for c, v in truth.items() if c not in small}
    assert _subtraction_attack(overall, published, {c: truth[c] for c in small}) == sorted(small)

    withheld = withheld_cells(masks, patients, 5)
    # With each small cell, the smallest sent cell of its attribute: >= 2 cells, >= k patients.
    assert withheld == small | {("sex", "M"), ("age", "<40")}
    published = {c: v for c, v in truth.items() if c not in withheld}
    hidden = {c: truth[c] for c in withheld}
    assert _subtraction_attack(overall, published, hidden) == []


def test_a_small_cell_derivable_across_attributes_makes_the_site_withhold_every_cell():
    from common.subgroups import derivable_cells, withheld_cells

    # The 3 "O" patients use scanner X with 12 men; those 12 men are exactly the >=65 band.
    # Per attribute O and M are withheld, yet O = (manufacturer X) - (age >=65).
    sex = ["O"] * 3 + ["M"] * 12 + ["F"] * 30 + ["M"] * 15
    manufacturer = ["X"] * 15 + ["Y"] * 45
    age = [50] * 3 + [70] * 12 + [50] * 45
    table = _table(sex, age, manufacturer=manufacturer)
    spec = SubgroupSpec(("sex", "age", "manufacturer"), age_bands=(40, 65), min_cell_size=5)
    masks, truth, overall = _cell_states(table, spec)
    patients = {cell: int(mask.sum()) for cell, mask in masks.items()}

    per_attribute = {("sex", "O"), ("sex", "M")}
    # O = X - (>=65), and then M = overall - F - O.
    assert derivable_cells(masks, per_attribute) == [("sex", "M"), ("sex", "O")]
    published = {c: v for c, v in truth.items() if c not in per_attribute}
    assert _subtraction_attack(overall, published, {("sex", "O"): truth[("sex", "O")]}) == [
        ("sex", "O")
    ]

    assert withheld_cells(masks, patients, 5) == set(masks)


def test_an_attribute_too_small_to_hide_a_cell_in_is_withheld_whole():
    from common.subgroups import withheld_cells

    sex = ["F"] * 8 + ["M"] * 3
    spec = SubgroupSpec(("sex", "age"), age_bands=(40,), min_cell_size=5)
    table = _table(sex, [30] * 5 + [50] * 6)
    masks = spec.cells(table)
    patients = {cell: int(mask.sum()) for cell, mask in masks.items()}
    # M (3) is small; F (8) withheld with it; both age bands (5, 6) are sent.
    assert withheld_cells(masks, patients, 5) == {("sex", "F"), ("sex", "M")}
    # Nothing small: nothing withheld.
    assert withheld_cells(masks, patients, 3) == set()
