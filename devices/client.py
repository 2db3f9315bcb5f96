"""HTTP client for the hub (httpx only): retries with exponential backoff and full jitter.

Transport errors, 429 and 5xx are retried; other 4xx are the hub's final answer and raise
``HubRefused`` with the status and the hub's one-line reason.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from edgepeft import atomic
from edgepeft.errors import HubError

RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HubRefused(HubError):
    """The hub answered with a final 4xx: the request itself is wrong (auth, validation, staleness)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"hub refused ({status}): {detail}")
        self.status = status
        self.detail = detail


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt)]."""
    return rng.uniform(0.0, min(cap, base * (2 ** attempt)))


class HubClient:
    """One device's (or the admin's) connection to a hub."""

    def __init__(self, url: str, token: str, *, retries: int = 6, backoff: float = 0.5, backoff_cap: float = 30.0,
                 timeout: float = 30.0, sleep: Callable[[float], None] = time.sleep, seed: int | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise HubError(f"hub URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.token = token.strip()
        self.retries, self.backoff, self.backoff_cap = retries, backoff, backoff_cap
        self.sleep = sleep
        self.rng = random.Random(seed)
        self.http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport,
                                 headers={"Authorization": f"Bearer {self.token}"})
        self.attempts = 0  # requests sent, retries included (for tests and stats)
        self.bytes_up = 0  # delta bytes accepted by the hub (pushes)
        self.bytes_down = 0  # version bytes downloaded (pulls)

    @property
    def device_id(self) -> str:
        """The device id a device token carries (``<device>.<secret>``)."""
        return self.token.split(".", 1)[0]

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "HubClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """Send with retries; a final 4xx raises HubRefused, exhausted retries raise HubError."""
        last = ""
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 400:
                    return r
                detail = _detail(r)
                if r.status_code not in RETRY_STATUS:
                    raise HubRefused(r.status_code, detail)
                last = f"{r.status_code} {detail}"
            if attempt < self.retries:
                self.sleep(backoff_delay(attempt, self.backoff, self.backoff_cap, self.rng))
        raise HubError(f"hub at {self.url} unreachable after {self.retries + 1} attempts ({last})")

    # ---- device calls ----------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """This device's id, fleet, bundle and latest versions."""
        return self.request("GET", "/api/v1/device").json()

    def push(self, data: bytes) -> dict[str, Any]:
        """Upload delta bytes (safetensors or packed) as this device; a retried upload is stored once."""
        r = self.request("POST", f"/api/v1/devices/{self.device_id}/deltas", content=data,
                         headers={"Content-Type": "application/octet-stream"}).json()
        self.bytes_up += len(data)
        return r

    def versions(self, fleet: str, adapter: str | None = None) -> list[dict[str, Any]]:
        """Published versions of the fleet."""
        params = {"adapter": adapter} if adapter else None
        return self.request("GET", f"/api/v1/fleets/{fleet}/versions", params=params).json()

    def download_version(self, fleet: str, adapter: str, version: int | str = "latest", *,
                         raw: bool = False, rank: int | None = None) -> tuple[int, bytes]:
        """(version number, bytes) of an adapter version: its packed transport form, or safetensors with ``raw``;
        ``rank``: refitted to that lower LoRA rank (a fleet of mixed ranks keeps each one it takes).

        The bytes are checked against the sha256 the hub states for them (HubError on a mismatch).
        """
        r = self.request("GET", f"/api/v1/fleets/{fleet}/adapters/{adapter}/versions/{version}",
                         params={**({"form": "raw"} if raw else {}), **({"rank": rank} if rank else {})} or None)
        stated = r.headers.get("x-edgepeft-sha256")
        if stated is None or hashlib.sha256(r.content).hexdigest() != stated:
            raise HubError(f"{fleet}/{adapter} v{version}: downloaded bytes do not match the sha256 the hub states; retry")
        self.bytes_down += len(r.content)
        return int(r.headers["x-edgepeft-version"]), r.content

    def report(self, values: dict[str, float], version: int | None = None) -> None:
        """Report metric values."""
        self.request("POST", f"/api/v1/devices/{self.device_id}/metrics", json={"values": values, "version": version})

    def download_bundle(self, fingerprint: str, dest: str | os.PathLike) -> Path:
        """Fetch a bundle into ``dest``, resuming partial files with range requests; checked by sha256."""
        dest = Path(os.fspath(dest))
        info = self.request("GET", f"/api/v1/bundles/{fingerprint}").json()
        dest.mkdir(parents=True, exist_ok=True)
        for f in info["files"]:
            final = dest / Path(f["name"]).name
            if final.is_file() and final.stat().st_size == f["size"]:
                continue
            part = dest / (final.name + ".part")
            have = part.stat().st_size if part.exists() else 0
            while have < f["size"]:
                r = self.request("GET", f"/api/v1/bundles/{fingerprint}/files/{f['name']}",
                                 headers={"Range": f"bytes={have}-{min(have + (8 << 20), f['size']) - 1}"})
                with open(part, "ab") as out:
                    out.write(r.content)
                have += len(r.content)
            data = part.read_bytes()
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                part.unlink()
                raise HubError(f"bundle file {f['name']}: checksum mismatch after download; retry")
            atomic.write_bytes(final, data)
            part.unlink()
        return dest


def _detail(r: httpx.Response) -> str:
    try:
        d = r.json().get("detail")
    except Exception:  # noqa: BLE001 - a proxy's HTML error page
        d = None
    text = d if isinstance(d, str) else (str(d) if d else r.text[:200])
    return " ".join(text.split())
