"""A new SQLite MLflow store is a copy of an empty one made once per MLflow version."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from server import tracking


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(tracking.STORE_CACHE_ENV, str(folder))
    return folder


def test_a_new_store_is_copied_from_the_cached_empty_one_and_works(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    tracking.ensure_store(f"sqlite:///{first}")
    templates = list(cache.glob("mlflow-*-empty.db"))
    assert len(templates) == 1 and first.exists()
    built = templates[0].stat().st_mtime_ns
    tracking.ensure_store(f"sqlite:///{second}")
    assert templates[0].stat().st_mtime_ns == built  # made once, copied twice
    client = MlflowClient(f"sqlite:///{second}")
    experiment_id = client.create_experiment("radfl")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "pooled/auc", 0.5, step=1)
    assert client.get_run(run.info.run_id).data.metrics == {"pooled/auc": 0.5}
    # As MLflow makes a new store: its Default experiment under the working folder.
    default = client.get_experiment("0")
    assert default.name == "Default"
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")
    assert not list(first.parent.glob(".*"))  # no partial copy left beside the store


def test_an_existing_store_is_never_replaced(tmp_path: Path, cache: Path):
    store = tmp_path / "mlflow.db"
    uri = f"sqlite:///{store}"
    tracking.ensure_store(uri)
    MlflowClient(uri).create_experiment("kept")
    tracking.ensure_store(uri)
    assert MlflowClient(uri).get_experiment_by_name("kept") is not None


def test_other_tracking_uris_are_left_to_mlflow(tmp_path: Path, cache: Path):
    tracking.ensure_store("http://127.0.0.1:5000")
    tracking.ensure_store(f"file://{tmp_path / 'mlruns'}")
    assert not cache.exists()
