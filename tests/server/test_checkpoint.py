"""Checkpoints load without unpickling code, stay inside checkpoint-dir, and are written durably."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from common.errors import ConfigError
from server import checkpoint


class _RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: a stand-in for any code an attacker plants."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def _payload() -> dict[str, Any]:
    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(2, np.float64)}
    return {
        "round": 3,
        "metrics": {"pooled/loss": np.float64(0.25), "train/sites": 3.0},
        "run-id": "abc123",
        "arrays": {"w": torch.ones(2, 3)},
        "strategy": {
            "current_arrays": arrays,  # FedAdam keeps NumPy arrays
            "m_t": {k: v * 2 for k, v in arrays.items()},
            "momentum_vector": [np.zeros(3, np.float32)],
        },
        "fedavgm": ArrayRecord({"w": torch.full((2,), 4.0)}),
        "recorder": {
            "best_state": {"w": torch.zeros(2)},
            "best_value": 0.5,
            "best_round": None,
            "rejections": [{"round": 2, "site": "site-b", "reason": "E-DATA"}],
        },
        "random": checkpoint.random_state(),
    }


def test_checkpoint_round_trips_arrays_records_and_random_states_with_weights_only(
    tmp_path: Path,
):
    path = checkpoint.checkpoint_path(str(tmp_path), "run-1")
    checkpoint.save(path, _payload())
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())

    loaded = checkpoint.load(path)
    # The file itself loads under torch's own weights_only unpickler, with no help from us.
    torch.load(path, weights_only=True)
    assert loaded["round"] == 3 and loaded["run-id"] == "abc123"
    assert loaded["metrics"]["pooled/loss"] == 0.25
    adam = loaded["strategy"]["current_arrays"]
    assert isinstance(adam["w"], np.ndarray) and adam["w"].dtype == np.float32
    np.testing.assert_array_equal(adam["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert adam["b"].dtype == np.float64
    assert isinstance(loaded["strategy"]["momentum_vector"], list)
    record = loaded["fedavgm"]
    assert isinstance(record, ArrayRecord)
    assert torch.equal(record.to_torch_state_dict()["w"], torch.full((2,), 4.0))
    assert loaded["recorder"]["rejections"][0]["site"] == "site-b"
    checkpoint.restore_random_state(loaded["random"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_a_checkpoint_whose_unpickling_runs_code_is_refused_and_the_code_does_not_run(
    tmp_path: Path,
):
    planted = checkpoint.checkpoint_path(str(tmp_path), "planted")
    planted.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"round": 1, "random": _RunsCode(marker)}, planted)

    with pytest.raises(ConfigError, match="refused to load checkpoint .*could run code"):
        checkpoint.load(planted)
    assert not marker.exists()
    # The planted file is a real attack: plain unpickling does run its code.
    torch.load(planted, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("run_key", ["../x", "..", "a/b", "/etc", ".hidden", "x\n", "a" * 129])
def test_a_run_key_that_is_not_a_plain_name_is_refused(tmp_path: Path, run_key: str):
    with pytest.raises(ConfigError, match="run-key must be a plain name"):
        checkpoint.checkpoint_path(str(tmp_path), run_key)


def test_save_writes_an_owner_only_file_through_a_unique_temporary_name_and_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = checkpoint.checkpoint_path(str(tmp_path / "ckpt"), "run-1")
    events: list[str] = []
    temporaries: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(source: str, target: Path) -> None:
        events.append("replace")
        temporaries.append(os.path.basename(source))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    checkpoint.save(path, {"round": 1})
    checkpoint.save(path, {"round": 2})

    assert events == ["fsync-file", "replace", "fsync-folder"] * 2
    assert len(set(temporaries)) == 2 and all(t.endswith(".tmp") for t in temporaries)
    assert sorted(os.listdir(path.parent)) == [checkpoint.NAME]  # no temporary left behind
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert checkpoint.load(path)["round"] == 2


def test_a_payload_that_cannot_be_stored_safely_leaves_the_previous_checkpoint(tmp_path: Path):
    path = checkpoint.checkpoint_path(str(tmp_path), "run-1")
    checkpoint.save(path, {"round": 1})
    with pytest.raises(TypeError, match=r"checkpoint\['recorder'\] is a _RunsCode"):
        checkpoint.save(path, {"round": 2, "recorder": _RunsCode(tmp_path / "m")})
    assert checkpoint.load(path)["round"] == 1
    assert os.listdir(path.parent) == [checkpoint.NAME]


def test_a_run_key_that_would_break_out_of_the_mlflow_filter_is_refused_by_find_run():
    from server.tracking import find_run

    with pytest.raises(ConfigError, match="run-key must be a plain name"):
        find_run("x' OR tags.`radfl.mode` = 'federated", "radfl")
