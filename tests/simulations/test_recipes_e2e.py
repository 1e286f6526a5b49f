"""End to end: transfer learning and a snapshot ensemble in one real simulation.

One tiny federation starts from a weights file of a three-class network (so the two-class run
replaces its head), freezes the feature layers for the first of two rounds and keeps both
rounds' global models (``snapshot-models``). The test then checks the frozen layers came back
unchanged from round 1 and changed in round 2, that a previous run's id is accepted as
``initial-weights`` and a tampered artifact of it refused, and that ``radfl ensemble`` of the
two snapshots, and ``radfl predict``'s loader of the folder it writes, give the mean of the
members' probabilities.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from client.predict import load_ensemble
from client.site import synthetic_site
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.tasks import get_task
from common.transfer import sha256_of
from server.snapshots import SNAPSHOT_ROUNDS_TAG
from server.transfer import load_initial_weights
from simulations import commands
from tests.simulations.conftest import (
    TINY_SETTINGS,
    run_radfl,
    set_options,
    the_run,
    tiny_simulate_command,
    tracking_env,
    tracking_uri,
)

pytestmark = pytest.mark.slow

SETTINGS: dict[str, Any] = {**TINY_SETTINGS, "model": "small-cnn", "augment": False}


def _config(cls: type, **overrides: Any) -> Any:
    hyphenated = {k.replace("_", "-"): v for k, v in overrides.items()}
    return from_run_config(cls, {**default_run_config(), **SETTINGS, **hyphenated})


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("recipes")
    torch.manual_seed(1)
    three = get_task(_config(ServerConfig, num_classes=3).model_config).build_model()
    pretrained = {k: v.clone() for k, v in three.state_dict().items()}
    weights = folder / "pretrained.pt"
    torch.save(pretrained, weights)
    output = run_radfl(
        tiny_simulate_command(
            sites=2,
            rounds=2,
            augment="false",
            initial_weights=str(weights),
            initial_weights_sha256=sha256_of(weights),
            freeze_layers="features.*",
            freeze_rounds=1,
            snapshot_models=2,
        ),
        folder,
        tracking_env(folder),
    )
    client, run = the_run(folder, "federated")
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri(folder)
    try:
        yield {
            "folder": folder,
            "output": output,
            "client": client,
            "run": run,
            "pretrained": pretrained,
        }
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous


def _snapshot(federation: dict[str, Any], server_round: int) -> dict[str, torch.Tensor]:
    client, run = federation["client"], federation["run"]
    path = client.download_artifacts(
        run.info.run_id, f"weights/round-{server_round}.pt", str(federation["folder"])
    )
    return torch.load(path, weights_only=True)


def test_the_run_starts_from_the_file_with_a_new_head_and_frozen_features(federation):
    run = federation["run"]
    assert run.data.tags["radfl.initial-weights-new-head"] == "fc.bias,fc.weight"
    assert "checksum verified" in federation["output"]
    assert sorted(run.data.tags[SNAPSHOT_ROUNDS_TAG].split(",")) == ["1", "2"]
    pretrained = federation["pretrained"]
    first, second = _snapshot(federation, 1), _snapshot(federation, 2)
    features = [k for k in pretrained if k.startswith("features.") and "num_batches" not in k]
    assert features
    for name in features:  # frozen in round 1: weights and running statistics as they came
        torch.testing.assert_close(first[name], pretrained[name], rtol=0, atol=1e-6)
    assert first["fc.weight"].shape == (2, pretrained["fc.weight"].shape[1])
    moved = max(float((second[k] - pretrained[k]).abs().max()) for k in features)
    assert moved > 1e-4  # unfrozen in round 2


def test_a_previous_run_is_taken_by_id_or_version_and_a_tampered_artifact_refused(federation):
    run_id = federation["run"].info.run_id
    config = dataclasses.replace(_config(ServerConfig), initial_weights=run_id)
    model = get_task(config.model_config).build_model()
    loaded = load_initial_weights(config, model)
    assert loaded.replaced_head == ()
    # The version the run registered names the same weights.
    registered = dataclasses.replace(
        config, initial_weights="models:/radfl-classification-small-cnn-2d/1"
    )
    by_name = load_initial_weights(registered, get_task(config.model_config).build_model())
    assert all(torch.equal(by_name.state[k], v) for k, v in loaded.state.items())
    stored = next((federation["folder"] / "mlartifacts").rglob("weights/best.pt"))
    state = torch.load(stored, weights_only=True)
    torch.save({k: v * 0 for k, v in state.items()}, stored)
    with pytest.raises(ConfigError, match=r"initial-weights .*best\.pt: checksum mismatch"):
        load_initial_weights(config, get_task(config.model_config).build_model())


def test_the_snapshot_ensemble_is_the_mean_of_its_members(federation, capsys):
    run_id = federation["run"].info.run_id
    out = federation["folder"] / "ensemble"
    parser = argparse.ArgumentParser()
    commands.ensemble.add_arguments(parser)
    args = parser.parse_args(
        [run_id, "--snapshots", "2", "--in-memory", "--sites", "2", "--out", str(out)]
        + set_options(SETTINGS)
    )
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert "ensemble of 2: test auc" in printed and "best member" in printed
    assert (out / "ensemble_report.csv").is_file()

    model = load_ensemble(str(out))
    assert model.task == "classification" and model.metadata["image_size"] == 32
    images = synthetic_site(0, 2, _config(ClientConfig)).test.images[:6]  # type: ignore[union-attr]
    members = []
    for server_round in (1, 2):
        member = get_task(_config(ServerConfig).model_config).build_model()
        member.load_state_dict(_snapshot(federation, server_round))
        members.append(member.eval())
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(images), 1) for m in members]).mean(0)
        got = torch.softmax(model.network(images), 1)
    torch.testing.assert_close(got, expected)
