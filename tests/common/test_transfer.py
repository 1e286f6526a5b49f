"""Transfer learning's checks on a weights file, played as the file's author: a file that is not
the vetted one, of the wrong shapes, with NaN, or with a pickle payload is refused by name; a
head is replaced when the class count differs; the freezing schedule freezes, then trains its
layers at the lower rate. Ensembles average probabilities."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest
import torch

from client.site import synthetic_site
from client.trainer import LocalTrainer
from common import ensemble
from common.config import ClientConfig, ServerConfig, default_run_config, from_run_config
from common.errors import ConfigError
from common.tasks import get_task
from common.transfer import (
    adapt_weights,
    head_layers,
    load_weights_file,
    sha256_of,
    verify_sha256,
)
from server.transfer import load_initial_weights


def _values(**overrides: object) -> dict[str, object]:
    values = {
        **default_run_config(),
        "model": "small-cnn",
        "image-size": 32,
        "batch-size": 8,
        "synthetic-samples-per-site": 40,
        "augment": False,
    }
    values.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return values


def _server(**overrides: object) -> ServerConfig:
    return from_run_config(ServerConfig, _values(**overrides))


def _saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.pt") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def _model(config: ServerConfig) -> torch.nn.Module:
    return get_task(config.model_config).build_model()


def test_sha256_of_is_sha256sum(tmp_path: Path):
    path = tmp_path / "x"
    path.write_bytes(b"radfl")
    assert sha256_of(path) == hashlib.sha256(b"radfl").hexdigest()


def test_a_file_that_is_not_the_vetted_one_is_refused_by_its_checksum(tmp_path: Path):
    config = _server()
    path = _saved(tmp_path, _model(config).state_dict())
    vetted = sha256_of(path)
    loaded = load_initial_weights(
        dataclasses.replace(config, initial_weights=str(path), initial_weights_sha256=vetted),
        _model(config),
    )
    assert loaded.replaced_head == ()
    # The attacker swaps the file after it was vetted.
    _saved(tmp_path, {k: v * 2 for k, v in _model(config).state_dict().items()})
    swapped = dataclasses.replace(config, initial_weights=str(path), initial_weights_sha256=vetted)
    with pytest.raises(ConfigError, match=r"initial-weights .*w\.pt: checksum mismatch"):
        load_initial_weights(swapped, _model(config))


def test_a_file_without_a_checksum_is_refused(tmp_path: Path):
    config = _server()
    path = _saved(tmp_path, _model(config).state_dict())
    with pytest.raises(ConfigError, match="no checksum to verify it against"):
        load_initial_weights(dataclasses.replace(config, initial_weights=str(path)), _model(config))


def test_a_pickle_payload_is_refused_by_weights_only_loading(tmp_path: Path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": Payload()}, path)
    with pytest.raises(ConfigError, match=r"evil\.pt: not a plain state dict of tensors"):
        load_weights_file(path)
    assert not marker.exists()


def test_a_file_of_something_else_than_tensors_is_refused(tmp_path: Path):
    path = _saved(tmp_path, {"fc.weight": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match=r"entry 'fc.weight' is a list, not a tensor"):
        load_weights_file(path)


def test_wrong_shapes_outside_the_head_are_refused_by_layer_name():
    config = _server()
    model = _model(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    name = next(k for k in state if k.endswith("weight") and not k.startswith("fc"))
    state[name] = torch.zeros(3, 3)
    with pytest.raises(
        ConfigError, match=rf"shape mismatch in layer\(s\) outside the head: {name}"
    ):
        adapt_weights(state, model, head_layers(config.model_config), source="w.pt")


def test_nan_values_are_refused_by_layer_name():
    config = _server()
    model = _model(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["fc.bias"][0] = float("nan")
    with pytest.raises(ConfigError, match="layer fc.bias holds NaN or infinite values"):
        adapt_weights(state, model, head_layers(config.model_config), source="w.pt")


def test_missing_and_unknown_layers_are_named():
    config = _server()
    model = _model(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match="lacks: extra.weight.*file lacks: fc.bias"):
        adapt_weights(state, model, head_layers(config.model_config), source="w.pt")


def test_the_head_is_replaced_when_the_class_count_differs(tmp_path: Path):
    three = _server(num_classes=3)
    pretrained = {
        k: v + 0.5 if v.is_floating_point() else v for k, v in _model(three).state_dict().items()
    }
    path = _saved(tmp_path, pretrained)
    two = _server(initial_weights=str(path), initial_weights_sha256=sha256_of(path))
    model = _model(two)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_initial_weights(two, model)
    assert loaded.replaced_head == ("fc.bias", "fc.weight")
    for name, value in loaded.state.items():
        expected = fresh[name] if name.startswith("fc.") else pretrained[name]
        assert torch.equal(value, expected), name


def test_heads_of_the_families():
    config = _server().model_config
    assert head_layers(config) == {"fc.weight", "fc.bias"}
    densenet = dataclasses.replace(config, model="densenet121")
    assert head_layers(densenet) == {"class_layers.out.weight", "class_layers.out.bias"}


def test_a_checksum_that_is_no_sha256_is_refused(tmp_path: Path):
    path = _saved(tmp_path, {"a": torch.zeros(1)})
    with pytest.raises(ConfigError, match="initial-weights-sha256 must be 64 hexadecimal"):
        verify_sha256(path, "abc")


def _client(**overrides: object) -> ClientConfig:
    return from_run_config(ClientConfig, _values(**overrides))


def _trainer(config: ClientConfig) -> tuple[object, LocalTrainer]:
    task = get_task(config.model_config)
    return task, LocalTrainer.for_site(
        task, config, synthetic_site(0, 2, config), device=torch.device("cpu")
    )


def test_freezing_keeps_the_layers_for_the_first_rounds_then_trains_them_slower():
    config = _client(
        freeze_layers="features.*",
        freeze_rounds=1,
        unfreeze_lr_factor=0.1,
        local_epochs=1,
        synthetic_samples_per_site=20,
    )
    task, trainer = _trainer(config)
    model = task.build_model()  # type: ignore[attr-defined]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, server_round=1, num_rounds=2)
    after = model.state_dict()
    frozen = [k for k in before if k.startswith("features.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # buffers too
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert all(p.requires_grad for p in model.parameters())
    trainer.fit(model, server_round=2, num_rounds=2)
    assert any(not torch.equal(before[k], model.state_dict()[k]) for k in frozen)


def test_a_freeze_pattern_matching_nothing_is_refused_by_name():
    task, trainer = _trainer(_client(freeze_layers="backbone.*", freeze_rounds=1))
    with pytest.raises(ConfigError, match="pattern 'backbone.\\*' matches no parameter"):
        trainer.fit(task.build_model())  # type: ignore[attr-defined]


def test_freeze_rounds_without_patterns_is_refused_by_key():
    with pytest.raises(ConfigError, match="freeze-rounds > 0 needs freeze-layers"):
        _client(freeze_rounds=2)


def test_the_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path: Path):
    config = _server()
    torch.manual_seed(0)
    members = [_model(config).eval() for _ in range(3)]
    images = torch.randn(5, 1, 32, 32)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(images), 1) for m in members]).mean(0)
        combined = torch.softmax(ensemble.MeanProbabilities(members)(images), 1)
    torch.testing.assert_close(combined, expected)
    metadata = {"task": "classification", "model": "small-cnn", "spatial_dims": 2,
                "image_size": 32, "num_classes": 2, "ct_window_hu": [-1000, 400]}  # fmt: skip
    folder = ensemble.write_folder(
        tmp_path / "ens", metadata, {f"m{i}": m.state_dict() for i, m in enumerate(members)}
    )
    network, read = ensemble.read_folder(folder)
    assert read == metadata
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(network(images), 1), expected)
    # A member file swapped after the folder was written is refused by its checksum.
    torch.save(_model(config).state_dict(), folder / "member-1.pt")
    with pytest.raises(ConfigError, match="ensemble member m1 .*member-1.pt: checksum mismatch"):
        ensemble.read_folder(folder)


def test_members_that_differ_in_classes_cannot_join():
    first = {"task": "classification", "num_classes": 2, "image_size": 32}
    with pytest.raises(ConfigError, match="model b differs from a in num_classes"):
        ensemble.shared_metadata(["a", "b"], [first, {**first, "num_classes": 3}])
