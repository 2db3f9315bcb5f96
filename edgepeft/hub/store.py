"""The hub's storage interface: a few primitives each backend implements, convenience built on them.

Public methods validate their arguments, then call a ``_hook``. Blobs are content-addressed: their
name is the hex sha256 of their bytes, never anything taken from a request. The backends import this module,
never the reverse: ``edgepeft.hub.backends.open_store`` picks one by URI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import time
from abc import ABC, abstractmethod
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from edgepeft.errors import ConflictError, HubError, NotFoundError
from edgepeft.hub.auth_cache import AuthCache
from edgepeft.hub.mixed_ranks import check_ranks
from edgepeft.manifest import Manifest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # fleets, devices, adapters
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
BUILDING, PUBLISHED = "building", "published"
READ_BATCH = 64  # stored deltas read per query when aggregating (6 MB of MiniLM-size packed deltas)
REVOKED = "revoked"  # a device's token_hash once revoked: no sha256 hex digest equals it


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a safe identifier (letters, digits, _ and -, at most 64), else HubError."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise HubError(f"{kind} name {name!r} is invalid; use 1-64 letters, digits, '_' or '-', starting with a letter or digit")
    return name


def check_sha(sha: str) -> str:
    """``sha`` if it is 64 lowercase hex digits (the only thing a blob is ever named by)."""
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        raise HubError(f"{sha!r} is not a sha256 hex digest")
    return sha


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def hash_token(token: str) -> str:
    """What the store keeps of a token: its sha256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class BundleFile:
    """One file of a registered bundle, stored as a blob."""

    name: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleRec:
    """A registered bundle: its fingerprint (id), manifest JSON and files."""

    fingerprint: str
    manifest_json: str
    created: float
    files: tuple[BundleFile, ...] = ()

    @property
    def manifest(self) -> Manifest:
        return Manifest.from_json(self.manifest_json, where=f"bundle {self.fingerprint[:16]}")


@dataclass(frozen=True)
class Fleet:
    """A group of devices training one bundle, and its aggregation policy."""

    name: str
    bundle: str  # fingerprint
    aggregate_every: int = 0  # aggregate when this many deltas are pending (0 = never by count)
    aggregate_minutes: float = 0.0  # aggregate when the oldest pending delta is this old (0 = never by time)
    staleness: int = 2  # refuse deltas whose parent is more than this many versions behind the latest
    robust: dict[str, Any] = field(default_factory=dict)  # default aggregation options (aggregate.RobustOptions)
    created: float = 0.0
    ranks: tuple[int, ...] = ()  # LoRA ranks devices may train at (empty: the bundle's rank only); see delta/ranks.py


@dataclass(frozen=True)
class Device:
    """A device: its id, fleet, and the sha256 of its token."""

    id: str
    fleet: str
    token_hash: str
    created: float
    last_seen: float | None = None

    @property
    def revoked(self) -> bool:
        return self.token_hash == REVOKED


@dataclass(frozen=True)
class DeltaRec:
    """An accepted delta. ``id`` is the sha256 of the uploaded bytes; ``version`` the aggregation it went into."""

    id: str
    fleet: str
    device: str
    adapter: str
    parent: int  # adapter version it was trained from (0 = none)
    samples: int
    size: int
    received: float
    version: int | None = None


@dataclass(frozen=True)
class VersionRec:
    """An adapter version: ``building`` while its claimed deltas are merged, then ``published``."""

    fleet: str
    adapter: str
    version: int
    state: str
    created: float
    options: dict[str, Any] = field(default_factory=dict)  # how it is built: {"publish": True} or aggregation options
    sha256: str | None = None
    size: int | None = None
    parent: int | None = None
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Metric:
    """One metric value a device reported."""

    fleet: str
    device: str
    name: str
    value: float
    version: int | None
    at: float


@dataclass(frozen=True)
class Due:
    """A fleet's aggregation policy as a claim checks it, inside its transaction: at least ``count`` pending deltas
    (0: no count rule), or the oldest pending one received at or before ``received_before`` (None: no age rule)."""

    count: int = 0
    received_before: float | None = None

    def holds(self, pending: int, oldest_received: float) -> bool:
        """Whether ``pending`` deltas, the oldest received at ``oldest_received``, make a version due."""
        if pending == 0:
            return False
        return (self.count > 0 and pending >= self.count) or (
            self.received_before is not None and oldest_received <= self.received_before)


class Store(ABC):
    """Storage of bundles, fleets, devices, deltas, adapter versions and metrics."""

    def __init__(self) -> None:
        self.auth_cache = AuthCache()  # accepted tokens of this process (hub/auth_cache.py)
        self._fleets_seen: dict[str, Fleet] = {}  # fleets never change once created: cached for good

    # ---- primitives -------------------------------------------------------------------------------

    @abstractmethod
    def _put_blob(self, sha: str, data: bytes) -> None:
        """Store ``data`` under ``sha`` unless present (atomic, idempotent)."""

    @abstractmethod
    def _read_blob(self, sha: str, start: int, length: int | None) -> bytes | None:
        """Bytes ``start .. start+length`` of a blob (``None`` length: to the end); None if absent."""

    @abstractmethod
    def _add_bundle(self, rec: BundleRec, blobs: dict[str, bytes]) -> bool:
        """Store a bundle's blobs and rows; False if the fingerprint is already registered."""

    @abstractmethod
    def get_bundle(self, fingerprint: str) -> BundleRec | None:
        """The bundle with this fingerprint, files included."""

    @abstractmethod
    def list_bundles(self) -> list[BundleRec]:
        """Every registered bundle (files included)."""

    @abstractmethod
    def _add_fleet(self, fleet: Fleet) -> bool:
        """Insert a fleet; False if the name is taken."""

    @abstractmethod
    def get_fleet(self, name: str) -> Fleet | None:
        """The fleet called ``name``."""

    @abstractmethod
    def list_fleets(self) -> list[Fleet]:
        """Every fleet, by name."""

    @abstractmethod
    def _add_device(self, device: Device) -> bool:
        """Insert a device; False if the id is taken."""

    @abstractmethod
    def get_device(self, device_id: str) -> Device | None:
        """The device with this id."""

    @abstractmethod
    def list_devices(self, fleet: str | None = None) -> list[Device]:
        """Devices (of one fleet, or all), by id."""

    @abstractmethod
    def _set_token_hash(self, device_id: str, token_hash: str) -> bool:
        """Replace a device's token hash (rotation, or ``REVOKED``); False if there is no such device."""

    @abstractmethod
    def _touch_device(self, device_id: str, when: float, wait: bool = True) -> None:
        """Record that the device was seen at ``when`` (``wait`` False: bookkeeping, nobody waits for the commit)."""

    @abstractmethod
    def _add_delta(self, rec: DeltaRec, data: bytes, content: str | None, token_hash: str | None = None) -> bool:
        """Store the delta's blob and row (and its content id) atomically; False, nothing changed, if the id
        or the content id exists. ``token_hash``: the uploader's token as authenticated; if the device's stored
        hash is no longer that (revoked or rotated meanwhile), nothing is stored and HubError says so."""

    def _add_delta_soon(self, rec: DeltaRec, data: bytes, content: str | None, token_hash: str | None = None) -> Future:
        """``_add_delta`` as a future, set once durable (a backend that batches commits returns before the commit)."""
        done: Future = Future()
        try:
            done.set_result(self._add_delta(rec, data, content, token_hash))
        except Exception as e:  # noqa: BLE001 - handed to whoever waits on the future
            done.set_exception(e)
        return done

    @abstractmethod
    def find_content(self, content: str) -> DeltaRec | None:
        """The delta stored under this content id (see ``limits.content_id``), if any."""

    @abstractmethod
    def get_delta(self, delta_id: str) -> DeltaRec | None:
        """The delta with this id (sha256)."""

    @abstractmethod
    def list_deltas(self, fleet: str, adapter: str | None = None, *, version: int | None = None,
                    pending: bool = False) -> list[DeltaRec]:
        """Deltas of a fleet, in arrival order: all, those aggregated into ``version``, or the pending ones."""

    @abstractmethod
    def _claim_version(self, fleet: str, adapter: str, options: dict[str, Any], created: float,
                       take_pending: bool, limit: int | None = None, due: Due | None = None) -> tuple[int, list[str]] | None:
        """Atomically: next version number, a ``building`` row, and (with ``take_pending``) every pending
        delta, or the first ``limit`` by arrival, claimed for it. None when ``take_pending`` and nothing is pending,
        or when ``due`` is given and the pending deltas, as the transaction sees them, do not make a version due."""

    @abstractmethod
    def _finish_version(self, fleet: str, adapter: str, version: int, data: bytes, sha: str,
                        parent: int | None, report: dict[str, Any]) -> bool:
        """Store the version's blob and mark it published; False if it was not ``building``."""

    @abstractmethod
    def list_versions(self, fleet: str, adapter: str | None = None, *, state: str | None = PUBLISHED) -> list[VersionRec]:
        """Versions of a fleet (optionally one adapter, one state), ordered by adapter then version."""

    @abstractmethod
    def _add_metrics(self, metrics: list[Metric]) -> None:
        """Append metric values."""

    @abstractmethod
    def list_metrics(self, fleet: str, limit: int = 10000) -> list[Metric]:
        """The most recent metric values of a fleet, oldest first."""

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    # ---- convenience -----------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store ``data``; returns its sha256 (its only name)."""
        sha = sha256_hex(data)
        self._put_blob(sha, data)
        return sha

    def get_blob(self, sha: str) -> bytes:
        """The whole blob named ``sha``."""
        data = self._read_blob(check_sha(sha), 0, None)
        if data is None:
            raise HubError(f"blob {sha[:16]} is missing from the store")
        return data

    def read_blob(self, sha: str, start: int, length: int) -> bytes:
        """A byte range of a blob (for HTTP range requests)."""
        if start < 0 or length < 0:
            raise HubError(f"bad byte range {start}+{length}")
        data = self._read_blob(check_sha(sha), start, length)
        if data is None:
            raise HubError(f"blob {sha[:16]} is missing from the store")
        return data

    def add_bundle(self, manifest_json: str, files: dict[str, bytes]) -> tuple[BundleRec, bool]:
        """Register a bundle from its files (name -> bytes); (record, newly added)."""
        manifest = Manifest.from_json(manifest_json, where="uploaded manifest.json")
        recs = tuple(sorted((BundleFile(n, sha256_hex(b), len(b)) for n, b in files.items()), key=lambda f: f.name))
        rec = BundleRec(manifest.fingerprint, manifest_json, time.time(), recs)
        added = self._add_bundle(rec, {f.sha256: files[f.name] for f in recs})
        return (rec if added else self.get_bundle(rec.fingerprint) or rec), added

    def create_fleet(self, name: str, bundle: str, *, aggregate_every: int = 0, aggregate_minutes: float = 0.0,
                     staleness: int = 2, robust: dict[str, Any] | None = None, ranks: Iterable[int] = ()) -> Fleet:
        """Create a fleet training ``bundle`` (a registered fingerprint); ``ranks``: LoRA ranks its devices may train at."""
        check_name("fleet", name)
        rec = self.get_bundle(bundle)
        if rec is None:
            raise HubError(f"no bundle {bundle[:16]!r} is registered; register it first (edgepeft hub bundle add)")
        if aggregate_every < 0 or aggregate_minutes < 0 or staleness < 0:
            raise HubError("aggregate_every, aggregate_minutes and staleness must be >= 0")
        allowed = check_ranks(ranks, rec.manifest)
        fleet = Fleet(name, bundle, int(aggregate_every), float(aggregate_minutes), int(staleness), dict(robust or {}), time.time(),
                      allowed)
        if not self._add_fleet(fleet):
            raise ConflictError(f"fleet {name!r} exists already")
        return fleet

    def add_device(self, fleet: str, device_id: str) -> str:
        """Add a device to a fleet; returns its token, which is shown once and stored only hashed."""
        check_name("device", device_id)
        if self.get_fleet(fleet) is None:
            raise NotFoundError(f"no fleet {fleet!r}")
        token = f"{device_id}.{secrets.token_urlsafe(32)}"
        if not self._add_device(Device(device_id, fleet, hash_token(token), time.time())):
            raise ConflictError(f"device {device_id!r} exists already")
        return token

    def rotate_token(self, device_id: str) -> str:
        """Give a device a new token (shown once); the old one fails from the next request on. Also un-revokes."""
        token = f"{check_name('device', device_id)}.{secrets.token_urlsafe(32)}"
        if not self._set_token_hash(device_id, hash_token(token)):
            raise NotFoundError(f"no device {device_id!r}")
        self.auth_cache.forget(device_id)
        return token

    def revoke_device(self, device_id: str) -> None:
        """Refuse the device's token from the next request on (rotate_token issues a new one)."""
        if not self._set_token_hash(check_name("device", device_id), REVOKED):
            raise NotFoundError(f"no device {device_id!r}")
        self.auth_cache.forget(device_id)

    def authenticate(self, token: str) -> Device | None:
        """The device whose token this is, compared in constant time; None otherwise. Accepted tokens are
        answered from ``auth_cache`` (no database read) until revoked, rotated, or ``auth_cache.TTL_S`` old."""
        device_id, sep, _ = token.partition(".")
        if not sep or not NAME_RE.match(device_id):
            return None
        token_hash = hash_token(token)
        cached = self.auth_cache.get(token_hash)
        if cached is not None:
            return cached
        generation = self.auth_cache.generation  # read before the row: a revoke in between keeps it out of the cache
        device = self.get_device(device_id)
        if device is None:
            hmac.compare_digest(token_hash, hash_token(""))  # same work whether or not the id exists
            return None
        ok = hmac.compare_digest(token_hash, device.token_hash) and not device.revoked
        if ok:
            self.auth_cache.put(token_hash, device, generation)
        return device if ok else None

    def touch_device(self, device_id: str) -> None:
        """Record that a device was seen now."""
        self._touch_device(device_id, time.time())

    def seen(self, device_id: str) -> None:
        """Record that a device was seen, at most once per ``auth_cache.TOUCH_EVERY_S`` in this process."""
        now = time.time()
        if self.auth_cache.touch_due(device_id, now):
            self._touch_device(device_id, now, wait=False)

    def cached_fleet(self, name: str) -> Fleet | None:
        """The fleet if this process has looked it up before (memory only: safe on an event loop)."""
        return self._fleets_seen.get(name)

    def fleet(self, name: str) -> Fleet | None:
        """``get_fleet``, answered from memory after the first time (a fleet never changes once created)."""
        found = self._fleets_seen.get(name)
        if found is None:
            found = self.get_fleet(name)
            if found is not None:
                self._fleets_seen[name] = found
        return found

    def add_delta(self, rec: DeltaRec, data: bytes, content: str | None = None, *, token_hash: str | None = None) -> bool:
        """Store an accepted (already validated) delta; False if these bytes, or this content, are stored already.
        ``token_hash``: store it only if the uploader's token is still this one (HubError otherwise)."""
        if rec.id != sha256_hex(data):
            raise HubError("delta id must be the sha256 of its bytes")
        if content is not None:
            check_sha(content)
        return self._add_delta(rec, data, content, token_hash)

    def add_delta_soon(self, rec: DeltaRec, data: bytes, content: str | None = None, *,
                       token_hash: str | None = None) -> Future:
        """:meth:`add_delta` as a future of its answer, set once the delta is durable: the calling thread need not
        wait through the commit (the hub's upload route awaits it on the event loop). Unlike :meth:`add_delta` it
        trusts ``rec.id`` to be the sha256 of ``data``: its one caller (hub/accept.py) hashed these bytes just before,
        and hashing a 94 KB delta again costs 0.05 ms, 3 % of an upload's hub CPU."""
        if content is not None:
            check_sha(content)
        return self._add_delta_soon(rec, data, content, token_hash)

    def delta_bytes(self, delta_id: str) -> bytes:
        """The stored bytes of a delta."""
        return self.get_blob(delta_id)

    def iter_delta_bytes(self, ids: list[str]) -> Iterator[tuple[str, bytes]]:
        """(id, bytes) for each id, read ``READ_BATCH`` at a time (one query a batch, where the backend can): memory
        stays flat, and 10,000 deltas are not 10,000 round trips (benchmarks/results/hub_agg.json)."""
        for lo in range(0, len(ids), READ_BATCH):
            batch = ids[lo:lo + READ_BATCH]
            got = self._read_blobs([check_sha(i) for i in batch])
            for i in batch:
                data = got.get(i)
                yield i, data if data is not None else self.get_blob(i)

    def _read_blobs(self, shas: list[str]) -> dict[str, bytes]:
        """Whole blobs by sha256, as many as one query finds (the rest are read one by one); default: none."""
        return {}

    def latest_version(self, fleet: str, adapter: str) -> VersionRec | None:
        """The newest published version of an adapter."""
        versions = self.list_versions(fleet, adapter)
        return versions[-1] if versions else None

    def get_version(self, fleet: str, adapter: str, version: int) -> VersionRec | None:
        """One version (any state)."""
        for v in self.list_versions(fleet, adapter, state=None):
            if v.version == version:
                return v
        return None

    def claim_version(self, fleet: str, adapter: str, options: dict[str, Any], *, take_pending: bool = True,
                      limit: int | None = None, due: Due | None = None) -> tuple[int, list[str]] | None:
        """Reserve the next version of an adapter and (by default) claim every pending delta, or the first ``limit``;
        with ``due``, only if the fleet's policy still holds when the claim runs (another hub process may have claimed
        the deltas that made it due a moment ago: without the check, the leftovers would make a version of their own)."""
        check_name("adapter", adapter)
        if self.get_fleet(fleet) is None:
            raise NotFoundError(f"no fleet {fleet!r}")
        if limit is not None and limit < 1:
            raise HubError(f"limit must be >= 1, got {limit}")
        return self._claim_version(fleet, adapter, dict(options), time.time(), take_pending, limit, due)

    def finish_version(self, fleet: str, adapter: str, version: int, data: bytes, *, parent: int | None,
                       report: dict[str, Any]) -> bool:
        """Publish a building version with its delta bytes."""
        return self._finish_version(fleet, adapter, version, data, sha256_hex(data), parent, report)

    def add_metrics(self, fleet: str, device: str, values: dict[str, float], version: int | None = None) -> int:
        """Record metric values reported by a device; returns how many."""
        now = time.time()
        rows = []
        for name, value in values.items():
            check_name("metric", name)
            rows.append(Metric(fleet, device, name, float(value), version, now))
        self._add_metrics(rows)
        return len(rows)


def dumps(obj: Any) -> str:
    """JSON for the store's text columns."""
    return json.dumps(obj, sort_keys=True)
