"""The site's own log of what it sent, and ``radfl site audit RUN`` that prints it.

A Flower mod around every handler of the ClientApp (outermost, so it sees the reply as it
leaves) appends one JSON line per reply to ``run-<RUN_ID>.jsonl`` in the site's audit folder:
the message type, and for each record each field with its type and size. Values are written
only where they are short facts a reviewer should see (counts, losses, the site's name, the
names of suppressed cells, refusal reasons); arrays (weights) and lists (metric states) get
their shape and size only. An error reply is logged with its reason.

The audit folder is the node config's ``audit-path``, else ``DATA-PATH/.radfl-logs/audit``
(a simulated site on disk: its synthetic site folder). A site without a folder (a synthetic
site generated in memory) keeps no audit log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from collections.abc import Iterable, Mapping
from logging import ERROR
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.site import LOG_FOLDER
from common.config import SIMULATION_DATA_ENV
from common.errors import RadFLError, public_message

if TYPE_CHECKING:  # Flower's types only: `radfl site audit` reads JSON
    from flwr.app import Context, Message
    from flwr.clientapp.typing import ClientAppCallable

AUDIT_FOLDER = Path(LOG_FOLDER) / "audit"
AUDIT_PATH_KEY = "audit-path"
#: Bytes per number of a MetricRecord/ConfigRecord value on the wire (int64/double).
NUMBER_BYTES = 8


def audit_folder(node_config: Mapping[str, Any]) -> Path | None:
    """Where this site's audit log goes; ``None`` for a site without a folder."""
    from client.disclosure import site_node_config

    config = site_node_config(node_config)
    if AUDIT_PATH_KEY in config:
        return Path(str(config[AUDIT_PATH_KEY])).expanduser()
    if "data-path" in config:
        return Path(str(config["data-path"])).expanduser() / AUDIT_FOLDER
    root = os.environ.get(SIMULATION_DATA_ENV)
    if root and "partition-id" in config:
        return Path(root) / f"site-{int(config['partition-id'])}" / AUDIT_FOLDER
    return None


def record_reply(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: pass the message on, then log the reply before it leaves the site."""
    reply = call_next(msg, context)
    folder = audit_folder(context.node_config)
    if folder is not None:
        entry = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "run_id": context.run_id,
            "run_key": str(context.run_config.get("run-key", "")),
            "message_type": msg.metadata.message_type,
            **describe_reply(reply),
        }
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with (folder / f"run-{context.run_id}.jsonl").open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        except OSError as exc:
            # Outermost mod: an exception here would reach Flower, which sends its text (the
            # site's path) to the coordinator. A reply that cannot be audited is not sent.
            from flwr.app import Error, Message
            from flwr.common.constant import ErrorCode
            from flwr.common.logger import log as flwr_log

            error = AuditError(f"the audit log in {folder} could not be written: {exc}")
            flwr_log(ERROR, "[radfl] %s", error)  # the site's own console
            reason = public_message(error)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )
    return reply


class AuditError(RadFLError):
    """The site's audit log could not be written: the reply is withheld."""

    code = "E-AUDIT"
    category = "site audit log not writable"


def describe_reply(reply: Message) -> dict[str, Any]:
    """``error`` (its reason, or ``None``) and ``records``: each record's fields described."""
    if reply.has_error():
        return {"error": reply.error.reason, "records": {}}
    return {
        "error": None,
        "records": {name: _describe(record) for name, record in reply.content.items()},
    }


def _describe(record: object) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    if isinstance(record, ArrayRecord):
        return {
            "kind": "arrays",
            "fields": {
                key: {"type": array.dtype, "shape": list(array.shape), "bytes": len(array.data)}
                for key, array in record.items()
            },
        }
    if isinstance(record, MetricRecord | ConfigRecord):
        kind = "metrics" if isinstance(record, MetricRecord) else "config"
        return {"kind": kind, "fields": {k: _describe_value(v) for k, v in record.items()}}
    return {"kind": type(record).__name__, "fields": {}}


def _describe_value(value: Any) -> dict[str, Any]:
    if isinstance(value, bytes):
        return {"type": "bytes", "bytes": len(value)}
    if isinstance(value, str):
        return {"type": "str", "value": value, "bytes": len(value.encode())}
    if isinstance(value, list):
        item = type(value[0]).__name__ if value else "empty"
        if value and isinstance(value[0], str):
            size = sum(len(v.encode()) for v in value)
            return {"type": "list[str]", "size": len(value), "value": value, "bytes": size}
        if value and isinstance(value[0], bytes):
            size = sum(len(v) for v in value)
            return {"type": "list[bytes]", "size": len(value), "bytes": size}
        return {"type": f"list[{item}]", "size": len(value), "bytes": NUMBER_BYTES * len(value)}
    return {"type": type(value).__name__, "value": value, "bytes": NUMBER_BYTES}


# ----------------------------------------------------------------------------- reading
def read_audit(folder: Path, run: str) -> list[dict[str, Any]]:
    """The audit entries of ``run``: a Flower run id, or the run key (``run-key``)."""
    folder = Path(folder)
    direct = folder / f"run-{run}.jsonl"
    files = [direct] if direct.is_file() else sorted(folder.glob("run-*.jsonl"))
    entries = []
    for path in files:
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if path == direct or entry.get("run_key") == run:
                entries.append(entry)
    if not entries:
        runs = ", ".join(sorted(p.stem.removeprefix("run-") for p in folder.glob("run-*.jsonl")))
        raise RadFLError(
            f"no audit log of run {run} in {folder}" + (f"; runs logged: {runs}" if runs else "")
        )
    return entries


def format_audit(entries: Iterable[dict[str, Any]]) -> str:
    """What a site sent in one run, per message type: how often, and each field's size."""
    by_type: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        by_type.setdefault(entry["message_type"], []).append(entry)
    lines = []
    for message_type, sent in sorted(by_type.items()):
        total = sum(_bytes(e) for e in sent)
        errors = [e["error"] for e in sent if e["error"]]
        lines.append(
            f"{message_type}: {len(sent)} message(s), {_size(total)}"
            + (f", {len(errors)} refused or failed" if errors else "")
        )
        for reason in sorted(set(errors)):
            lines.append(f"  error: {reason}")
        fields: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for entry in sent:
            for name, record in entry["records"].items():
                for key, field in record["fields"].items():
                    fields.setdefault((f"{record['kind']} {_record_name(name)}", key), []).append(
                        field
                    )
        for (record, key), seen in sorted(fields.items()):
            lines.append(f"  {record:<28} {key:<24} {_field_summary(seen)}")
    return "\n".join(lines)


def _record_name(name: str) -> str:
    """``test/sex=F`` as ``test/<cell>``: one line for all cells of a split."""
    split, sep, _ = name.partition("/")
    return f"{split}/<cell>" if sep else name


def _bytes(entry: Mapping[str, Any]) -> int:
    return sum(
        int(field.get("bytes", 0))
        for record in entry["records"].values()
        for field in record["fields"].values()
    )


def _field_summary(seen: list[dict[str, Any]]) -> str:
    kind = seen[0]["type"]
    total = sum(int(f.get("bytes", 0)) for f in seen)
    text = f"{kind:<12} x{len(seen):<4} {_size(total):>10}"
    if "shape" in seen[0]:
        text += f"  shape {tuple(seen[0]['shape'])}"
    elif "size" in seen[0] and kind != "list[str]":
        text += f"  {seen[0]['size']} values each"
    values = [f["value"] for f in seen if "value" in f]
    distinct = sorted({json.dumps(v) for v in values})
    if values and kind in ("str", "list[str]", "int") and len(distinct) <= 3:
        text += "  " + " | ".join(distinct)
    return text


def _size(num_bytes: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="the run: Flower run id, or the RadFL run key")
    parser.add_argument(
        "--data", type=Path, default=Path("."), help="the site folder (default: here)"
    )
    parser.add_argument(
        "--audit-path", type=Path, help="the audit folder, if the site set audit-path"
    )
    parser.add_argument("--json", action="store_true", help="print the raw entries")


def run(args: argparse.Namespace) -> int:
    folder = args.audit_path or Path(args.data) / AUDIT_FOLDER
    entries = read_audit(folder, args.run)
    if args.json:
        for entry in entries:
            print(json.dumps(entry))
    else:
        print(f"What this site sent in run {args.run} ({len(entries)} messages, from {folder}):")
        print(format_audit(entries))
    return 0
