"""The token check every request makes, answered from memory: accepted device tokens, cached per process.

Keyed by the token's sha256 (what the store keeps), so the cache holds no token, and a key is found only by
presenting the token itself. Rotating or revoking a device through this process forgets its entries before the
call returns, so its next request is refused at once. Another hub process over the same store (PostgreSQL, or
SQLite under ``hub serve --workers``) sees the change within ``TTL_S``; uploads do not even wait for that: the
accept's INSERT names the token hash it authenticated with (``SqlStore._add_delta``), so a revoked token's upload is
refused by whichever process commits it.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # store.py holds the cache: a type-only import, no loop
    from edgepeft.hub.store import Device

TTL_S = 2.0  # how long another hub process may still answer a token revoked elsewhere (reads only)
MAX_ENTRIES = 100_000  # about 20 MB; past it the cache starts over (a fleet's devices refill it on their next request)
TOUCH_EVERY_S = 10.0  # a device's last_seen is written at most this often per process


class AuthCache:
    """Accepted tokens (by sha256) and when each device was last recorded as seen; thread-safe."""

    def __init__(self, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[Device, float]] = {}
        self._touched: dict[str, float] = {}
        self.generation = 0  # bumped by every forget: a lookup that began before one does not refill the cache

    def get(self, token_hash: str) -> Device | None:
        """The device this token hash authenticated as, if that was checked within ``ttl_s``."""
        entry = self._entries.get(token_hash)  # a dict read is atomic under the GIL: no lock on the hot path
        if entry is None or time.monotonic() - entry[1] > self.ttl_s:
            return None
        return entry[0]

    def put(self, token_hash: str, device: Device, generation: int) -> None:
        """Remember an accepted token, unless a device was forgotten since ``generation`` was read."""
        with self._lock:
            if generation != self.generation:
                return
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[token_hash] = (device, time.monotonic())

    def forget(self, device_id: str) -> None:
        """Drop every entry of ``device_id`` (its token was rotated or revoked)."""
        with self._lock:
            self.generation += 1
            for key in [k for k, (d, _) in self._entries.items() if d.id == device_id]:
                del self._entries[key]

    def touch_due(self, device_id: str, now: float) -> bool:
        """True (and noted) if ``device_id`` was not recorded as seen in the last ``TOUCH_EVERY_S``."""
        with self._lock:
            if now - self._touched.get(device_id, float("-inf")) < TOUCH_EVERY_S:
                return False
            if len(self._touched) >= MAX_ENTRIES:
                self._touched.clear()
            self._touched[device_id] = now
            return True
