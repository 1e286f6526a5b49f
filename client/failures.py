"""What a failing site tells the coordinator: a code and a category, never the error's text.

Left to Flower, an exception raised by a ClientApp handler travels to the coordinator as
``str(type(exc)) + ":<'" + str(exc) + "'>"`` (``flwr/supernode/runtime/run_clientapp.py`` in a
deployment, ``flwr/server/superlink/fleet/vce/vce_api.py`` in a simulation, which also logs
the traceback with its chained causes in the SuperLink's process), and the coordinator logs it
and writes it to MLflow. RadFL's messages name the site's folder, its files and its patients
("patient p1 has conflicting sex"), which must not leave the hospital.

``contain_errors`` is the outermost mod of the site ClientApp. While a handler runs, RadFL's
loggers (``client.*``, ``common.*``) write to the site's own log file (``client.site.log_path``)
instead of the process's console, which a simulation shares with the coordinator. If the
handler raises, the full text and traceback go to that file, and the reply is an error
``Message`` whose reason is only ``common.errors.public_message`` ("site data check failed
(E-DATA): 3 problems, see the site's log"). No exception leaves the ClientApp, so Flower has no
text of its own to send or log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from logging import ERROR, WARNING
from pathlib import Path

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log as flwr_log

from client.site import log_path, site_name
from common.errors import public_message

log = logging.getLogger(__name__)

#: RadFL's own loggers: what they say at a site stays in the site's log file.
SITE_LOGGERS = ("client", "common")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def contain_errors(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """A Flower mod: run the handler with the site's log; turn any exception into an error
    reply that carries only its code and category."""
    with site_log(log_path(context.node_config)):
        try:
            return call_next(msg, context)
        except Exception as exc:  # every exception: its text must not reach Flower
            reason = public_message(exc)
            log.error(
                "%s failed at site %s: %s",
                msg.metadata.message_type,
                _name(context),
                reason,
                exc_info=exc,
            )
            # On the site's console only what the coordinator is told too.
            flwr_log(ERROR, "[radfl] %s failed: %s", msg.metadata.message_type, reason)
            return Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg
            )


@contextlib.contextmanager
def site_log(path: Path | None) -> Iterator[None]:
    """Send RadFL's log records to ``path`` (and not the console) for the ``with`` block.

    Without a path (a synthetic hospital in memory) nothing changes. If the file cannot be
    opened, records stay on the console, which at a real site is the site's own.
    """
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        flwr_log(WARNING, "[radfl] cannot open the site's log file: %s", type(exc).__name__)
        yield
        return
    handler.setFormatter(logging.Formatter(_FORMAT))
    # Only this thread's records: in ``radfl simulate``'s own process the ServerApp's thread
    # logs through the same loggers, and the coordinator's records are not the site's.
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    loggers = [logging.getLogger(name) for name in SITE_LOGGERS]
    saved = [(logger, logger.propagate, logger.level) for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.propagate = False
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        for logger, propagate, level in saved:
            logger.removeHandler(handler)
            logger.propagate = propagate
            logger.setLevel(level)
        handler.close()


def _name(context: Context) -> str:
    try:
        return site_name(context.node_config)
    except ValueError:
        return "?"
