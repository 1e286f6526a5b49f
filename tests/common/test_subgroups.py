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
