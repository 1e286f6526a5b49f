"""What leaves a failing site: a code and a category; the full text stays in the site's log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.constant import ErrorCode

from client import app
from client.data import SiteDataError
from client.failures import contain_errors, site_log
from client.site import CLIENTAPP_LOG, LOG_FOLDER
from common.config import default_run_config
from common.errors import ConfigError, RadFLError, RegistryError, public_message
from tests.client.test_data import rng, write_manifest, write_png

PATIENT = "PHI-PATIENT-7731"
FILE = "scans/PLANTED-FILE-4411.png"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            SiteDataError(f"site check of /data/x failed: {FILE}: patient {PATIENT}", problems=3),
            "site data check failed (E-DATA): 3 problems, see the site's log",
        ),
        (
            SiteDataError(f"{FILE}: file not found", problems=1),
            "site data check failed (E-DATA): 1 problem, see the site's log",
        ),
        (
            SiteDataError(f"/data/{FILE}: the site folder does not exist"),
            "site data check failed (E-DATA): see the site's log",
        ),
        (
            ConfigError(f"node_config data-path /data/{PATIENT} is wrong"),
            "site configuration refused (E-CONFIG): see the site's log",
        ),
        (
            RegistryError(f"unknown model {PATIENT}"),
            "site configuration refused (E-CONFIG): see the site's log",
        ),
        (RadFLError(PATIENT), "site refused the task (E-RADFL): see the site's log"),
        (
            RuntimeError(f"cannot read {FILE} of {PATIENT}"),
            "site app failed (E-INTERNAL): RuntimeError, see the site's log",
        ),
        (MemoryError(PATIENT), "site ran out of memory (E-MEMORY): see the site's log"),
    ],
)
def test_public_message_is_a_code_and_a_category_never_the_text(
    error: BaseException, expected: str
) -> None:
    message = public_message(error)
    assert message == expected
    assert PATIENT not in message and "PLANTED" not in message and "/data" not in message


def test_an_exception_class_name_that_is_not_an_identifier_is_not_sent() -> None:
    crafted = type("patient PHI-1 has conflicting sex", (Exception,), {})
    assert (
        public_message(crafted()) == "site app failed (E-INTERNAL): exception, see the site's log"
    )


def _context(node_config: dict[str, object]) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=RecordDict(),
        run_config={**default_run_config(), "image-size": 32},
    )


def test_contain_errors_replies_the_code_and_logs_the_text_only_at_the_site(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    log_file = tmp_path / "logs" / "site.log"
    context = _context({"site-name": "site-a", "log-path": str(log_file)})
    message = Message(content=RecordDict(), dst_node_id=7, message_type="train")

    def failing(msg: Message, ctx: Context) -> Message:
        logging.getLogger("client.check").warning("skipping %s of patient %s", FILE, PATIENT)
        raise SiteDataError(f"{FILE}: patient {PATIENT} has conflicting sex", problems=2)

    reply = contain_errors(message, context, failing)

    assert reply.has_error()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason == "site data check failed (E-DATA): 2 problems, see the site's log"
    site_text = log_file.read_text()
    assert f"patient {PATIENT} has conflicting sex" in site_text  # the full text, and
    assert "Traceback" in site_text and f"skipping {FILE}" in site_text  # what it logged
    # The console (which a simulation shares with the coordinator) and every log record that
    # reaches the root logger hold only what the coordinator is told.
    console = capfd.readouterr()
    shown = console.out + console.err + caplog.text
    assert PATIENT not in shown and "PLANTED" not in shown
    assert "[radfl] train failed: site data check failed (E-DATA)" in caplog.text
    # Outside a handler RadFL's loggers are as they were.
    assert logging.getLogger("client").propagate and not logging.getLogger("client").handlers


def test_site_log_leaves_loggers_alone_without_a_log_file() -> None:
    with site_log(None):
        assert logging.getLogger("client").propagate


def test_the_site_clientapp_refuses_a_bad_site_folder_with_a_code_and_a_count(
    tmp_path: Path,
) -> None:
    """The production ClientApp on a real site folder whose check fails: a patient with
    conflicting sex (2 problems) and a missing file (1)."""
    site = tmp_path / "site"
    for name in ("a.png", "b.png"):
        write_png(site / name, rng(0).integers(0, 255, size=(32, 32)))
    write_manifest(
        site,
        "image,patient_id,study_id,label,sex",
        f"a.png,{PATIENT},s1,0,F",
        f"b.png,{PATIENT},s2,1,M",
        f"{FILE},p2,s3,0,F",
    )
    context = _context({"data-path": str(site), "site-name": "site-a"})
    query = Message(content=RecordDict(), dst_node_id=7, message_type="query")

    reply = app.app(query, context)

    assert reply.has_error()
    assert reply.error.reason == "site data check failed (E-DATA): 3 problems, see the site's log"
    site_text = (site / LOG_FOLDER / CLIENTAPP_LOG).read_text()
    assert f"patient {PATIENT} has conflicting sex" in site_text
    assert f"{FILE}: file not found" in site_text


def test_a_reply_the_audit_log_cannot_record_is_withheld_with_a_code_and_no_path(tmp_path):
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from client.audit import record_reply

    blocked = tmp_path / "PATIENT-P0001-folder"
    blocked.write_text("a file where the audit folder should be")
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"audit-path": str(blocked / "audit")},
        state=RecordDict(),
        run_config={},
    )
    msg = Message(
        RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type="train"
    )

    def handler(m: Message, c: Context) -> Message:
        return Message(RecordDict({"site": ConfigRecord({"name": "a"})}), reply_to=m)

    reply = record_reply(msg, context, handler)
    assert reply.has_error()
    assert "E-AUDIT" in reply.error.reason
    assert "PATIENT" not in reply.error.reason and str(tmp_path) not in reply.error.reason
