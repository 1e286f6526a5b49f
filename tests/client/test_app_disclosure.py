"""The ClientApp's handlers under a coordinator that asks for identifiers, a small k and more
evaluations than the site allows; and the site's audit log of what it sent."""

import json
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client import app, audit
from common.config import default_run_config
from common.tasks import get_task

RUN_CONFIG = {
    **default_run_config(),
    "model": "small-cnn",
    "image-size": 32,
    "synthetic-samples-per-site": 120,
    "local-epochs": 1,
    "batch-size": 8,
    "run-key": "privacy-unit",
}
#: The synthetic hospitals' patient ids: ``site-0-p00012``.
PATIENT_ID = re.compile(r"site-\d+-p\d{5}")


def _context(node_config=None, **run_config) -> Context:
    return Context(
        run_id=11,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 2, **(node_config or {})},
        state=RecordDict(),
        run_config={**RUN_CONFIG, **run_config},
    )


def _message(message_type: str) -> Message:
    from common.config import ClientConfig, from_run_config

    config = from_run_config(ClientConfig, RUN_CONFIG)
    model = get_task(config.model_config).build_model()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict())})
    return Message(content=content, dst_node_id=7, message_type=message_type)


def _strings(content: RecordDict) -> list[str]:
    """Every key and every string value of a reply."""
    out = []
    for name, record in content.items():
        out.append(name)
        if isinstance(record, ConfigRecord | MetricRecord):
            for key, value in record.items():
                out.append(key)
                values = value if isinstance(value, list) else [value]
                out += [v for v in values if isinstance(v, str)]
    return out


def test_final_evaluation_refuses_identifiers_by_name_and_sends_nothing_of_them():
    context = _context(subgroups="sex,age,patient_id,study_id,site", **{"min-cell-size": 1})
    reply = app.final_evaluation(_message("evaluate.final"), context)
    assert not reply.has_error()
    refused = reply.content["refused"]
    assert sorted(refused) == ["patient_id", "study_id"]
    assert "identifier" in refused["patient_id"]
    strings = _strings(reply.content)
    assert not [s for s in strings if PATIENT_ID.search(s)]
    assert not [s for s in strings if "patient_id=" in s or "study_id=" in s]
    # The rest of the reply still goes: overall states and the allowed attributes.
    assert "test" in reply.content and "validation" in reply.content
    cells = [name for name in reply.content if "/" in name]
    suppressed = [c for cells in reply.content["suppressed"].values() for c in cells]
    assert {c.split("/")[1].split("=")[0] for c in cells} | {
        c.split("=")[0] for c in suppressed
    } <= {"sex", "age"}


def test_the_site_floor_raises_k_above_what_the_run_asks():
    def sent(node_config):
        reply = app.final_evaluation(
            _message("evaluate.final"), _context(node_config, **{"min-cell-size": 1})
        )
        return [record["patients"] for name, record in reply.content.items() if "/" in name]

    assert min(sent({"min-cell-size": 1})) < 15  # a site accepting the run's k = 1
    assert min(sent({})) >= 10  # the default floor
    high = sent({"min-cell-size": 15})
    assert high and min(high) >= 15


def test_evaluations_past_the_site_cap_are_refused_and_the_reason_goes_back():
    context = _context({"max-evaluations": 2})
    message = _message("evaluate")
    assert not app.evaluate(message, context).has_error()
    assert not app.final_evaluation(_message("evaluate.final"), context).has_error()
    refused = app.evaluate(message, context)
    assert refused.has_error()
    assert "at most 2 evaluations per run (max-evaluations)" in refused.error.reason


def test_the_audit_log_lists_every_reply_field_with_its_size_and_no_weights(tmp_path):
    context = _context(
        {"audit-path": str(tmp_path), "max-evaluations-per-model": 1},
        subgroups="sex,patient_id",
        **{"min-cell-size": 1},
    )
    client_app = app.build_app()
    client_app(_message("evaluate.final"), context)
    client_app(_message("evaluate"), context)  # the same model again: refused
    lines = (tmp_path / "run-11.jsonl").read_text().splitlines()
    final, refused = (json.loads(line) for line in lines)
    assert final["message_type"] == "evaluate.final" and final["run_key"] == "privacy-unit"
    assert final["records"]["refused"]["fields"]["patient_id"]["type"] == "str"
    histogram = final["records"]["test"]["fields"]["state.histogram"]
    assert histogram == {"type": "list[float]", "size": 2 * 2 * 2000, "bytes": 8 * 8000}
    assert "max-evaluations-per-model" in refused["error"] and refused["records"] == {}
    assert not PATIENT_ID.search("\n".join(lines))

    text = audit.format_audit(audit.read_audit(tmp_path, "privacy-unit"))
    assert "evaluate.final: 1 message(s)" in text and "evaluate: 1 message(s)" in text
    assert "1 refused or failed" in text
    assert re.search(r"metrics test/<cell> +state.histogram +list\[float\]", text)
    assert audit.read_audit(tmp_path, "11") == audit.read_audit(tmp_path, "privacy-unit")
    with pytest.raises(audit.RadFLError, match="no audit log of run 12 .* runs logged: 11"):
        audit.read_audit(tmp_path, "12")


def test_weights_are_logged_by_shape_and_size_only():
    weights = _message("train").content["arrays"]
    reply = Message(content=RecordDict({"arrays": weights}), reply_to=_message("train"))
    described = audit.describe_reply(reply)["records"]["arrays"]
    assert described["kind"] == "arrays" and set(described["fields"]) == set(weights)
    for name, field in described["fields"].items():
        assert set(field) == {"type", "shape", "bytes"}
        assert field["shape"] == list(weights[name].shape)


def test_a_coordinator_asking_for_tiny_cells_gets_no_attention_state_resting_on_few_cases(
    monkeypatch,
):
    # The run asks for k = 1; the site's floor is 30 cases with a lesion mask behind any
    # attention state. Where fewer have one, it goes as zeros (with its attribute's other
    # cells), and the refused record says where, by message. (An untrained network's Grad-CAM
    # is often empty; uniform maps give every lesion case a share.)
    from common import attention

    monkeypatch.setattr(attention, "grad_cam", lambda model, images: torch.ones_like(images))
    context = _context({"min-cell-size": 30}, subgroups="sex,site", **{"min-cell-size": 1})
    reply = app.final_evaluation(_message("evaluate.final"), context)
    assert not reply.has_error()
    sent = {
        name: record["state.attention"]
        for name, record in reply.content.items()
        if isinstance(record, MetricRecord)
    }
    assert sent and all(values[0] == 0 or values[0] >= 30 for values in sent.values())
    reason = reply.content["refused"]["attention_in_lesion"]
    assert reason.startswith("withheld where fewer than k = 30 cases have a lesion mask: ")
    named = reason.split(": ", 1)[1].split(", ")
    assert named and all(sent[name] == [0.0, 0.0, 0.0] for name in named)
    # A site that accepts k = 1 sends them: the states exist and the rule is what withholds.
    open_reply = app.final_evaluation(
        _message("evaluate.final"), _context({"min-cell-size": 1}, **{"min-cell-size": 1})
    )
    assert any(r["state.attention"][0] > 0 for n, r in open_reply.content.items() if n == "test")
