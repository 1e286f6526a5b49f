"""The site's disclosure policy, played against a coordinator asking for more than it may have."""

import argparse
import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from client import daemon
from client.disclosure import (
    SIMULATION_NODE_CONFIG_ENV,
    DisclosurePolicy,
    parse_node_config,
    site_node_config,
)
from common.errors import ConfigError
from common.subgroups import SubgroupSpec


def test_the_default_policy_reports_sex_age_manufacturer_modality_at_k_10():
    policy = DisclosurePolicy.from_node_config({"partition-id": 0})
    assert policy.attributes == ("sex", "age", "manufacturer", "modality")
    assert policy.min_cell_size == 10


def test_identifiers_and_unlisted_attributes_are_refused_by_name_and_the_floor_holds():
    policy = DisclosurePolicy.from_node_config({"min-cell-size": 20})
    asked = SubgroupSpec(
        ("sex", "patient_id", "clinical_note", "study_id", "image", "site"), min_cell_size=1
    )
    spec, refused = policy.apply(asked)
    assert spec.attributes == ("sex", "site") and spec.min_cell_size == 20
    assert sorted(refused) == ["clinical_note", "image", "patient_id", "study_id"]
    assert "identifier" in refused["patient_id"] and "identifier" in refused["image"]
    assert "subgroup-attributes" in refused["clinical_note"]
    # A run asking for more than the floor gets what it asks.
    assert policy.apply(SubgroupSpec(("sex",), min_cell_size=30))[0].min_cell_size == 30


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"subgroup-attributes": "sex,patient_id"}, "subgroup-attributes lists patient_id"),
        ({"subgroup-attributes": "study_id"}, "identifiers"),
        ({"min-cell-size": 0}, "min-cell-size must be >= 1"),
        ({"min-cell-size": "ten"}, "min-cell-size must be a whole number"),
        ({"max-evaluations": -1}, "max-evaluations must be a whole number"),
        ({"max-evaluations-per-model": 0}, "max-evaluations-per-model must be >= 1"),
    ],
)
def test_a_bad_policy_names_its_key(node_config, message):
    with pytest.raises(ConfigError, match=message):
        DisclosurePolicy.from_node_config(node_config)


def _evaluate(weights: float, message_type: str = "evaluate") -> Message:
    arrays = ArrayRecord({"w": Array(np.full(3, weights, dtype=np.float32))})
    return Message(RecordDict({"arrays": arrays}), dst_node_id=1, message_type=message_type)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_evaluations_past_either_cap_are_refused_with_a_reason_naming_the_cap():
    policy = DisclosurePolicy(max_evaluations=4, max_evaluations_per_model=2)
    context = _context()
    assert policy.admit_evaluation(_evaluate(0.0), context) is None
    assert policy.admit_evaluation(_evaluate(0.0, "evaluate.final"), context) is None
    refusal = policy.admit_evaluation(_evaluate(0.0), context)
    assert refusal is not None and refusal.has_error()
    assert "at most 2 times per run (max-evaluations-per-model)" in refusal.error.reason
    assert policy.admit_evaluation(_evaluate(1.0), context) is None
    assert policy.admit_evaluation(_evaluate(2.0), context) is None
    refusal = policy.admit_evaluation(_evaluate(3.0), context)
    assert refusal is not None
    assert "at most 4 evaluations per run (max-evaluations)" in refusal.error.reason
    # A refused request is not counted: the state holds 4 answered evaluations.
    assert context.state["radfl.evaluation-counts"]["run"] == 4


def test_virtual_sites_take_the_simulation_node_config_and_real_ones_ignore_it(monkeypatch):
    monkeypatch.setenv(SIMULATION_NODE_CONFIG_ENV, json.dumps({"min-cell-size": 25}))
    assert site_node_config({"partition-id": 1})["min-cell-size"] == 25
    assert "min-cell-size" not in site_node_config({"data-path": "/data/site"})
    # The site's own node config wins over the shared one.
    assert site_node_config({"partition-id": 1, "min-cell-size": 30})["min-cell-size"] == 30


def test_node_config_strings_parse_like_flower_supernode_takes_them():
    values = parse_node_config('min-cell-size=20 subgroup-attributes="sex,age" skip-bad-rows=true')
    assert values == {"min-cell-size": 20, "subgroup-attributes": "sex,age", "skip-bad-rows": True}
    with pytest.raises(ConfigError, match="--node-config"):
        parse_node_config("min-cell-size=")


def test_site_start_policy_options_reach_the_supernode_node_config():
    parser = argparse.ArgumentParser()
    daemon.add_policy_arguments(parser)
    args = parser.parse_args(["--min-cell-size", "15", "--subgroup-attributes", "sex,age"])
    config = daemon.policy_node_config(args)
    assert config["min-cell-size"] == 15 and config["subgroup-attributes"] == "sex,age"
    assert config["max-evaluations"] == 1000 and config["max-evaluations-per-model"] == 3
    bad = parser.parse_args(["--subgroup-attributes", "sex,patient_id"])
    with pytest.raises(ConfigError, match="patient_id"):
        daemon.policy_node_config(bad)


def test_the_supernode_reads_back_the_policy_site_start_gives_it():
    from flwr.common.config import parse_config_args

    parser = argparse.ArgumentParser()
    daemon.add_policy_arguments(parser)
    args = parser.parse_args(["--subgroup-attributes", "sex,age", "--dp-epsilon", "3.5"])
    command = daemon.supernode_command(
        superlink="fl.example.org:8000",
        data="/srv/site",
        name="site-a",
        root_certificates="ca.crt",
        auth_key="site.key",
        port=None,
        extra_config=daemon.policy_node_config(args),
    )
    # Flower's own parser of --node-config, as flower-supernode runs it.
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    policy = DisclosurePolicy.from_node_config(node_config)
    assert policy.attributes == ("sex", "age") and policy.dp_epsilon == 3.5
    assert policy.min_cell_size == 10 and policy.max_evaluations_per_model == 3
