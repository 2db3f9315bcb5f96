"""The hub's logging: uvicorn's config plus a filter that keeps secrets out of the access log.

The hub takes tokens only from the ``Authorization`` header (never logged), but a client may still put
one in a URL (an old bookmark, a script); the access log records URLs, so query values of any key that
looks like a secret are replaced before the line is written.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

_SECRET_QUERY = re.compile(r"(?i)([?&][^=&#]*(?:token|secret|key|password|auth)[^=&#]*=)[^&#]*")


def redact(url: str) -> str:
    """``url`` with the value of every secret-looking query parameter replaced by ``[redacted]``."""
    return _SECRET_QUERY.sub(r"\1[redacted]", url)


class RedactSecrets(logging.Filter):
    """Rewrites uvicorn access-log records (args: client, method, path with query, http version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def hub_log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's default logging config with :class:`RedactSecrets` on the access and error handlers."""
    from uvicorn.config import LOGGING_CONFIG

    cfg = copy.deepcopy(LOGGING_CONFIG)
    cfg.setdefault("filters", {})["redact"] = {"()": RedactSecrets}
    for handler in cfg["handlers"].values():
        handler.setdefault("filters", []).append("redact")
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        if name in cfg["loggers"]:
            cfg["loggers"][name]["level"] = level.upper()
    return cfg
