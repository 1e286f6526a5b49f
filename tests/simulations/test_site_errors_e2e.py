"""A real simulation with one site whose data check fails on a planted patient id and file
name: the coordinator learns only the error's code and category. Neither planted string
reaches the run's output, the SuperLink's files, or MLflow (params, tags, metrics, artifacts,
the tracking database); the site's own log has the full text."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest

from simulations.synth import FederationSpec, write_federation
from tests.simulations.test_simulate_e2e import RADFL, _client, _env, _only_run

pytestmark = pytest.mark.slow

PATIENT = "PHI-PATIENT-7731"
FILE = "scans/PLANTED-FILE-4411.png"
PLANTED = (PATIENT, "PLANTED-FILE-4411")


def _plant(site: Path) -> None:
    """Give two rows one patient with conflicting sex, and point a third at a missing file."""
    path = site / "manifest.csv"
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    table.loc[0, ["patient_id", "sex"]] = [PATIENT, "F"]
    table.loc[1, ["patient_id", "sex"]] = [PATIENT, "M"]
    table.loc[2, "image"] = FILE
    table.to_csv(path, index=False)


def _planted_in(text: str) -> list[str]:
    return [s for s in PLANTED if s in text]


def test_a_failing_site_tells_the_coordinator_a_code_and_keeps_the_detail(tmp_path: Path):
    data = tmp_path / "data"
    spec = FederationSpec(
        sites=3,
        task="classification",
        dims=2,
        seed=0,
        samples_per_site=24,
        image_size=32,
        num_classes=2,
    )
    write_federation(data, spec)
    _plant(data / "site-2")
    settings = {"image-size": 32, "batch-size": 8, "local-epochs": 1, "min-cell-size": 2}
    overrides = [part for k, v in settings.items() for part in ("--set", f"{k}={v}")]
    command = [
        RADFL, "simulate", "--data", str(data), "--sites", "3", "--rounds", "1",
        "--model", "small-cnn", "--workdir", str(tmp_path / "work"), *overrides,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]

    # The coordinator was told, by code: site-2 failed its check with 3 problems.
    public = "site data check failed (E-DATA): 3 problems, see the site's log"
    assert public in output, output[-5000:]
    assert _planted_in(output) == [], output[-5000:]

    client = _client(tmp_path)
    run = _only_run(client, "federated")
    assert run.info.status == "FINISHED"
    for kind, values in (
        ("params", run.data.params),
        ("tags", run.data.tags),
        ("metrics", run.data.metrics),
    ):
        text = "\n".join(f"{k}={v}" for k, v in values.items())
        assert _planted_in(text) == [], kind
    artifacts = tmp_path / "artifacts"
    client.download_artifacts(run.info.run_id, "", str(artifacts))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    rejections = next(p for p in files if p.name == "rejections.csv").read_text()
    assert public in rejections  # the training message to site-2 failed the same way
    for path in files:
        assert _planted_in(path.read_bytes().decode("latin-1")) == [], path

    # Everything the coordinator's side wrote (tracking database, artifacts, SuperLink state
    # and logs, Flower's home) holds neither string; only the site's own folder does.
    for path in tmp_path.rglob("*"):
        if path.is_file() and data not in path.parents:
            assert _planted_in(path.read_bytes().decode("latin-1")) == [], path
    site_log = (data / "site-2" / ".radfl-logs" / "clientapp.log").read_text()
    assert f"patient {PATIENT} has conflicting sex" in site_log
    assert f"{FILE}: file not found" in site_log
