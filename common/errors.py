"""Errors RadFL raises on purpose. Each message names the bad argument, key, site or file.

A message is for the person who can fix the problem, at the place it happened: at a site it
may name the site's folder, its files and its patients. What may leave a site is only the
error's ``code`` and ``category`` (``public_message``); the full text stays in the site's log.
"""

from __future__ import annotations

import re


class RadFLError(Exception):
    """Base class of every error RadFL raises on purpose."""

    #: Short, fixed identifiers that may leave a site (never built from the message).
    code = "E-RADFL"
    category = "site refused the task"

    def public_detail(self) -> str:
        """A count or other fact that carries no clinical detail; empty by default."""
        return ""


class ConfigError(RadFLError, ValueError):
    """A run or node configuration key is unknown, missing or has a bad value."""

    code = "E-CONFIG"
    category = "site configuration refused"


class RegistryError(RadFLError, KeyError):
    """A name is unknown to a registry, or registered twice."""

    code = "E-CONFIG"
    category = "site configuration refused"

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class SiteDataError(RadFLError, ValueError):
    """A site's manifest or images cannot be used; the message names the file (and CSV line).

    Only ``code``, ``category`` and the number of ``problems`` leave the site
    (``common.errors.public_message``): the message names files and patients.
    """

    code = "E-DATA"
    category = "site data check failed"

    def __init__(self, message: str, *, problems: int | None = None) -> None:
        super().__init__(message)
        self.problems = problems

    def public_detail(self) -> str:
        if self.problems is None:
            return ""
        return f"{self.problems} problem{'' if self.problems == 1 else 's'}"


#: What every public message ends with: where the full text is.
SEE_SITE_LOG = "see the site's log"
_TYPE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def public_message(error: BaseException) -> str:
    """What a site may tell the coordinator about ``error``: a code and a short category.

    Never the error's message, which may hold paths, file names and patient ids. For an error
    RadFL did not raise on purpose, the exception's class name (code, not data) is added.
    """
    if isinstance(error, RadFLError):
        detail = error.public_detail()
        return f"{error.category} ({error.code}): {detail + ', ' if detail else ''}{SEE_SITE_LOG}"
    name = type(error).__name__
    if isinstance(error, MemoryError) or name == "OutOfMemoryError":  # torch's CUDA/MPS OOM
        return f"site ran out of memory (E-MEMORY): {SEE_SITE_LOG}"
    shown = name if _TYPE_NAME.fullmatch(name) else "exception"
    return f"site app failed (E-INTERNAL): {shown}, {SEE_SITE_LOG}"
