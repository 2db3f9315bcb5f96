"""The device's outbox: deltas waiting to be pushed, one file each, written atomically.

A file is named ``<sequence>-<key>.delta`` (sequence keeps the order, key is the sha256 of the data
the delta was trained on, or of the delta itself). It leaves the outbox only when the hub has
accepted it (or refused it for good, into ``rejected/``), so restarts and long offline spells lose
nothing and a retry after a lost answer is harmless: the hub stores an upload once.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft import atomic
from edgepeft.errors import HubError

_NAME = re.compile(r"^(\d{20})-([0-9a-f]{64})\.delta$")


@dataclass(frozen=True)
class Item:
    """One queued delta."""

    path: Path
    key: str

    def read(self) -> bytes:
        return self.path.read_bytes()


@dataclass
class FlushResult:
    sent: int = 0
    rejected: int = 0
    left: int = 0
    error: str | None = None  # why flushing stopped early (hub unreachable)
    stale: list[str] = field(default_factory=list)  # keys refused as stale (409): their data can be retrained


class Outbox:
    """A folder of deltas to push."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(os.fspath(root))
        self.rejected_dir = self.root / "rejected"
        self.root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, key: str | None = None) -> Item:
        """Queue ``data`` (atomically); ``key`` defaults to its sha256. A key already queued is not queued twice."""
        key = key or hashlib.sha256(data).hexdigest()
        for item in self.pending():
            if item.key == key:
                return item
        path = self.root / f"{time.time_ns():020d}-{key}.delta"
        atomic.write_bytes(path, data)
        return Item(path, key)

    def pending(self) -> list[Item]:
        """Queued deltas, oldest first."""
        out = []
        for p in sorted(self.root.iterdir()):
            m = _NAME.match(p.name)
            if m and p.is_file():
                out.append(Item(p, m.group(2)))
        return out

    def has(self, key: str) -> bool:
        return any(i.key == key for i in self.pending())

    def flush(self, push) -> FlushResult:
        """Push every queued delta with ``push(bytes)``; stop at the first transport failure (kept for later)."""
        from edgepeft.devices.client import HubRefused

        res = FlushResult()
        items = self.pending()
        for n, item in enumerate(items):
            try:
                push(item.read())
            except HubRefused as e:
                if e.status in (401, 403):  # the token is wrong: keep everything until it is fixed
                    res.error, res.left = str(e), len(items) - n
                    return res
                self.rejected_dir.mkdir(exist_ok=True)
                os.replace(item.path, self.rejected_dir / item.path.name)
                atomic.write_text(self.rejected_dir / (item.path.name + ".why"), str(e) + "\n")
                res.rejected += 1
                if e.status == 409:
                    res.stale.append(item.key)
                continue
            except HubError as e:
                res.error, res.left = str(e), len(items) - n
                return res
            item.path.unlink()
            res.sent += 1
        return res
