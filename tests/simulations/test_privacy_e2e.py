"""End to end: what leaves a site when the coordinator plays the curious server.

One real simulation of two synthetic hospitals on disk (site-0 stores DICOM, so its files carry
UIDs), whose manifests gain a free-text column with a unique note per study. The run asks for
identifiers and the note as subgroups and for k = 1; the sites' policy (``--node-config``) keeps
k = 5. The ClientApp is wrapped in a test mod that writes every reply exactly as it travels
(Flower's protobuf bytes) and, for the final evaluation only, the true states of every cell,
computed at the site (test instrumentation, never sent). The test then

* scans the wire bytes, the sites' audit logs and everything in MLflow (params, tags, metric
  names, every artifact) for patient ids, study ids, image paths, the data folder, DICOM UIDs
  and the notes;
* plays the subtraction attack on the replies: overall minus the sent cells of an attribute,
  and every -1/0/1 combination of the sent records, against each withheld cell's true states.
"""

from __future__ import annotations

import csv
import itertools
import json
import re
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.simulations.conftest import (
    RADFL,
    app_with_clientapp,
    run_radfl,
    set_options,
    the_run,
    tiny_simulate_command,
    tracking_env,
)

SITE_K = 5
AGE_BANDS = "40,65,80"
ATTRIBUTES = ("sex", "age", "manufacturer", "modality")
NOTE = "clinical_note"

pytestmark = pytest.mark.slow

RECORDING_CLIENT = '''
"""The RadFL ClientApp, with a test mod recording replies as they travel and cell truths."""
import json
import os

from flwr.common.serde import recorddict_to_proto

from client.app import _config, _prepare, build_app
from common.subgroups import SubgroupSpec, cell_name

OUT = os.environ["RADFL_PRIVACY_RECORD"]


def record(msg, context, call_next):
    reply = call_next(msg, context)
    site = int(context.node_config["partition-id"])
    with open(os.path.join(OUT, f"wire-{site}.bin"), "ab") as wire:
        if reply.has_error():
            wire.write(reply.error.reason.encode())
        else:
            wire.write(recorddict_to_proto(reply.content).SerializeToString())
    if msg.metadata.message_type == "evaluate.final" and not reply.has_error():
        sent = {
            name: dict(record)
            for name, record in reply.content.items()
            if name not in ("site",)
        }
        # Test instrumentation: the true states of every cell, never sent.
        _, trainer, model, data = _prepare(msg, context, _config(context))
        spec = SubgroupSpec(
            tuple(os.environ["RADFL_PRIVACY_ATTRIBUTES"].split(",")),
            tuple(int(a) for a in os.environ["RADFL_PRIVACY_AGE_BANDS"].split(",")),
            min_cell_size=1,
        )
        truth = {}
        for split, dataset in (("validation", data.validation), ("test", data.test)):
            result = trainer.evaluate_cells(model, dataset, spec)
            truth[split] = result.overall.to_record()
            for cell, states in result.cells.items():
                truth[f"{split}/{cell}"] = states.to_record()
        with open(os.path.join(OUT, f"final-{site}.json"), "w") as handle:
            json.dump({"sent": sent, "truth": truth}, handle)
    return reply


app = build_app(mods=[record])
'''


@pytest.fixture(scope="module")
def curious_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("privacy-e2e")
    data = tmp / "hospitals"
    done = subprocess.run(
        [RADFL, "synth", "--out", str(data), "--sites", "2", "--samples-per-site", "220"]
        + ["--image-size", "32", "--seed", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    secrets_by_kind = _add_notes_and_collect_identifiers(data)

    app_dir = app_with_clientapp(tmp / "app", "recording_client", RECORDING_CLIENT)
    record = tmp / "record"
    record.mkdir()
    env = tracking_env(
        tmp,
        RADFL_PRIVACY_RECORD=str(record),
        RADFL_PRIVACY_ATTRIBUTES=",".join(ATTRIBUTES),
        RADFL_PRIVACY_AGE_BANDS=AGE_BANDS,
    )
    settings = {
        "image-size": 32,
        "local-epochs": 1,
        "batch-size": 16,
        "min-cell-size": 1,
        "age-bands": AGE_BANDS,
        "subgroups": f"sex,age,manufacturer,modality,patient_id,study_id,{NOTE},site",
        "run-key": "curious-run",
    }
    command = [RADFL, "simulate", "--app-dir", str(app_dir), "--data", str(data)]
    command += ["--sites", "2", "--rounds", "1", "--model", "small-cnn"]
    command += ["--node-config", f"min-cell-size={SITE_K}"]
    command += set_options(settings)
    output = run_radfl(command, tmp, env)
    client, run = the_run(tmp)
    return {
        "tmp": tmp,
        "data": data,
        "record": record,
        "output": output,
        "env": env,
        "client": client,
        "run": run,
        "secrets": secrets_by_kind,
    }


def _add_notes_and_collect_identifiers(data: Path) -> dict[str, set[str]]:
    """Give every manifest row a free-text note; return every identifier a site holds."""
    found: dict[str, set[str]] = {
        "patient id": set(),
        "study id": set(),
        "image path": {str(data.resolve())},
        "free text": set(),
        "DICOM UID": set(),
    }
    for manifest in sorted(data.glob("site-*/manifest.csv")):
        with manifest.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        for row in rows:
            row[NOTE] = f"NOTE-{secrets.token_hex(6)} referred by Dr Example, query nodule"
            found["patient id"].add(row["patient_id"])
            found["study id"].add(row["study_id"])
            found["image path"].add(row["image"])
            found["free text"].add(row[NOTE])
            image = manifest.parent / row["image"]
            if image.suffix == ".dcm":
                header = pydicom.dcmread(image, stop_before_pixels=True)
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
                    found["DICOM UID"].add(str(header.get(keyword)))
        with manifest.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    assert found["DICOM UID"], "site-0 should store DICOM"
    return found


def _leaks(text: bytes, secrets_by_kind: dict[str, set[str]]) -> list[str]:
    return [
        f"{kind}: {value}"
        for kind, values in secrets_by_kind.items()
        for value in values
        if value.encode() in text
    ]


def test_the_curious_run_is_refused_identifiers_and_notes_by_name(curious_run):
    output = curious_run["output"]
    for site in ("site-0", "site-1"):
        for attribute in ("patient_id", "study_id", NOTE):
            assert f"site {site} refused subgroup attribute {attribute}" in output


def test_no_identifier_path_uid_or_note_leaves_a_site_on_the_wire(curious_run):
    wire = b"".join(p.read_bytes() for p in sorted(curious_run["record"].glob("wire-*.bin")))
    assert len(wire) > 100_000  # the weights and states did travel
    assert _leaks(wire, curious_run["secrets"]) == []
    # The scan finds what is there: every kind of identifier is in a site's own files.
    manifest = (curious_run["data"] / "site-0" / "manifest.csv").read_bytes()
    kinds = {leak.split(":")[0] for leak in _leaks(manifest, curious_run["secrets"])}
    assert kinds == {"patient id", "study id", "image path", "free text"}


def test_each_site_audit_log_lists_what_it_sent_and_holds_no_identifier(curious_run):
    for site in ("site-0", "site-1"):
        folder = curious_run["data"] / site / ".radfl-logs" / "audit"
        (log,) = folder.glob("run-*.jsonl")
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        kinds = {e["message_type"] for e in entries}
        assert kinds == {"query", "train", "evaluate", "evaluate.final"}
        assert _leaks(log.read_bytes(), curious_run["secrets"]) == []
        shown = subprocess.run(
            [RADFL, "site", "audit", "curious-run", "--data", str(curious_run["data"] / site)],
            capture_output=True,
            text=True,
            timeout=120,
            env=curious_run["env"],
        )
        assert shown.returncode == 0, shown.stderr
        assert "evaluate.final: 1 message(s)" in shown.stdout
        assert re.search(r"arrays arrays +\S+ +float32", shown.stdout)
        assert "refused" in shown.stdout and "patient_id" in shown.stdout


def test_mlflow_holds_no_identifier_path_uid_or_note(curious_run):
    client, run = curious_run["client"], curious_run["run"]
    texts = [
        json.dumps(run.data.params).encode(),
        json.dumps(run.data.tags).encode(),
        json.dumps(sorted(run.data.metrics)).encode(),
    ]
    folder = Path(client.download_artifacts(run.info.run_id, "", str(curious_run["tmp"] / "dl")))
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "states.json" for p in files) or any("report" in str(p) for p in files)
    texts += [p.read_bytes() for p in files]
    assert _leaks(b"\n".join(texts), curious_run["secrets"]) == []
    # No cell of a refused attribute reached the report either.
    assert not any(b"patient_id=" in t or f"{NOTE}=".encode() in t for t in texts)


def test_no_withheld_cell_can_be_recovered_by_subtraction_from_the_replies(curious_run):
    attacked = mixed = 0
    for path in sorted(curious_run["record"].glob("final-*.json")):
        recorded = json.loads(path.read_text())
        sent, truth = recorded["sent"], recorded["truth"]
        suppressed = sent.get("suppressed", {})
        for split in ("validation", "test"):
            # The recording is faithful: the true overall equals the one sent.
            assert _integer_states(truth[split]).tolist() == _integer_states(sent[split]).tolist()
            prefix = f"{split}/"
            published = {n: _integer_states(r) for n, r in sent.items() if n.startswith(prefix)}
            for name in published:
                assert sent[name]["patients"] >= SITE_K
            hidden = {
                cell: _integer_states(truth[f"{split}/{cell}"])
                for cell in suppressed.get(split, [])
                if f"{split}/{cell}" in truth  # empty cells have no states
            }
            if not hidden:
                continue
            overall = _integer_states(sent[split])
            # 1. Overall minus the sent cells of each attribute.
            for attribute in ATTRIBUTES:
                mine = [v for n, v in published.items() if _attribute(n) == attribute]
                if mine and any(c.startswith(f"{attribute}=") for c in hidden):
                    mixed += 1  # cells sent and withheld: the subtraction has a target
                residual = overall - sum(mine, np.zeros_like(overall))
                for cell, states in hidden.items():
                    assert not np.array_equal(residual, states), (path.name, split, cell)
            # 2. Every -1/0/1 combination of the overall and up to 7 sent records.
            recovered = _combination_attack(overall, list(published.values())[:7], hidden)
            assert recovered == [], (path.name, split, recovered)
            attacked += len(hidden)
    # The attack had something to find: small cells were withheld at k = 5, next to sent
    # cells of the same attribute.
    assert attacked >= 2 and mixed >= 1


def _attribute(name: str) -> str:
    """``test/age=40-64`` -> ``age``."""
    return name.split("/", 1)[1].split("=", 1)[0]


def _integer_states(record: dict) -> np.ndarray:
    """The states a subtraction recovers exactly: histogram, confusion counts, count."""
    parts = [record[k] for k in ("state.histogram", "state.confusion", "state.count")]
    return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])


def _combination_attack(overall: np.ndarray, published: list, hidden: dict) -> list[str]:
    vectors = np.stack([overall, *published])
    weights = np.random.default_rng(0).integers(-(2**20), 2**20, vectors.shape[1])
    projected = vectors @ weights
    found = set()
    for coefficients in itertools.product((-1, 0, 1), repeat=len(vectors)):
        value = int(np.dot(coefficients, projected))
        for cell, states in hidden.items():
            if value == int(states @ weights) and np.array_equal(
                np.asarray(coefficients) @ vectors, states
            ):
                found.add(cell)
    return sorted(found)


def test_a_dp_sgd_simulation_logs_each_site_epsilon_every_round(tmp_path: Path):
    command = tiny_simulate_command(
        sites=2,
        rounds=2,
        synthetic_samples_per_site=60,
        dp_noise_multiplier=1.0,
        dp_max_grad_norm=1.0,
    )
    run_radfl(command, tmp_path, tracking_env(tmp_path))
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED"
    for site in ("site-0", "site-1"):
        history = client.get_metric_history(run.info.run_id, f"site/{site}/dp-epsilon")
        values = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert len(values) == 2 and 0 < values[0] < values[1], values
    assert "test/auc" in run.data.metrics
