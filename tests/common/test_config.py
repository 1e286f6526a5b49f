from pathlib import Path

import pytest

from common.config import (
    ClientConfig,
    ServerConfig,
    default_run_config,
    from_run_config,
    load_toml_config,
)
from common.errors import ConfigError


def test_defaults_build_both_app_configs():
    run_config = default_run_config()
    server = from_run_config(ServerConfig, run_config)
    client = from_run_config(ClientConfig, run_config)
    assert server.num_rounds == run_config["num-rounds"]
    assert run_config["batch-size"] == 0  # the task's own
    assert client.batch_size == 32 and client.task == "classification"
    assert server.model_config == client.model_config


@pytest.mark.parametrize(
    ("task", "batch_size", "expected"),
    [
        ("classification", 0, 32),
        ("segmentation", 0, 8),
        ("detection", 0, 8),
        ("instance", 0, 8),
        ("segmentation", 16, 16),
    ],
)
def test_batch_size_zero_is_the_tasks_own_and_a_set_one_is_kept(task, batch_size, expected):
    run_config = {**default_run_config(), "task": task, "batch-size": batch_size}
    assert from_run_config(ClientConfig, run_config).batch_size == expected


def test_a_negative_batch_size_is_refused():
    with pytest.raises(ConfigError, match="batch-size must be positive"):
        from_run_config(ClientConfig, {**default_run_config(), "batch-size": -4})


def test_unknown_key_raises_with_its_name():
    run_config = {**default_run_config(), "num-round": 3}
    with pytest.raises(ConfigError, match="num-round"):
        from_run_config(ServerConfig, run_config)


def test_missing_key_raises_with_its_name():
    run_config = default_run_config()
    del run_config["local-epochs"]
    from_run_config(ServerConfig, run_config)  # the server does not need it
    with pytest.raises(ConfigError, match="local-epochs"):
        from_run_config(ClientConfig, run_config)


@pytest.mark.parametrize(
    ("key", "value"),
    [("num-rounds", "three"), ("num-rounds", 2.5), ("augment", "maybe"), ("model", 3)],
)
def test_wrong_type_raises_with_key_name(key, value):
    run_config = {**default_run_config(), key: value}
    with pytest.raises(ConfigError, match=key):
        from_run_config(ServerConfig if key != "augment" else ClientConfig, run_config)


def test_bad_choice_raises():
    with pytest.raises(ConfigError, match="lr-schedule"):
        from_run_config(ClientConfig, {**default_run_config(), "lr-schedule": "step"})


@pytest.mark.parametrize(
    ("cls", "key"),
    [
        (ServerConfig, "final-model"),
        (ClientConfig, "optimizer"),
        (ClientConfig, "lr-schedule"),
        (ClientConfig, "class-balancing"),
        (ClientConfig, "precision"),
        (ClientConfig, "update-compression"),
    ],
)
def test_enumerated_keys_are_literal_types_and_refuse_other_values_by_name(cls, key):
    from typing import Literal, get_args, get_origin, get_type_hints

    annotation = get_type_hints(cls)[key.replace("-", "_")]
    assert get_origin(annotation) is Literal
    assert default_run_config()[key] in get_args(annotation)
    choices = ", ".join(get_args(annotation))
    with pytest.raises(
        ConfigError, match=f"run-config key {key} must be one of {choices}; got 'x'"
    ):
        from_run_config(cls, {**default_run_config(), key: "x"})
    with pytest.raises(ConfigError, match=f"run-config key {key} must be a string, got 3"):
        from_run_config(cls, {**default_run_config(), key: 3})


def test_set_overrides_parse_to_run_config_values_and_format_back():
    from common.config import format_run_config, parse_overrides

    values = parse_overrides(["num-rounds=3", "augment=false", "model=resnet18", "x=0.5"])
    assert values == {"num-rounds": 3, "augment": False, "model": "resnet18", "x": 0.5}
    assert format_run_config(values) == 'num-rounds=3 augment=false model="resnet18" x=0.5'
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE, got 'rounds'"):
        parse_overrides(["rounds"])


def test_config_is_frozen():
    config = from_run_config(ServerConfig, default_run_config())
    with pytest.raises(AttributeError):
        config.num_rounds = 5  # type: ignore[misc]


def test_toml_overrides(tmp_path: Path):
    path = tmp_path / "run.toml"
    path.write_text('[config]\nnum-rounds = 5\nmodel = "small-cnn"\n')
    assert load_toml_config(path) == {"num-rounds": 5, "model": "small-cnn"}
    path.write_text("num-roundz = 5\n")
    with pytest.raises(ConfigError, match="num-roundz"):
        load_toml_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_toml_config(tmp_path / "missing.toml")
