"""The SQL both backends share: schema, row mapping, and every metadata primitive.

A backend supplies a connection pool (``_tx``), how to serialize aggregation claims per fleet
(``_lock_fleet``) and where blobs live. Queries use ``?`` placeholders; PostgreSQL's ``%s`` is
substituted by the backend.
"""

from __future__ import annotations

import contextlib
import json
import logging
from abc import abstractmethod
from concurrent.futures import Future
from typing import Any, Callable, Iterator

from edgepeft.errors import AuthError
from edgepeft.hub.group_commit import GroupCommit
from edgepeft.hub.store import (BUILDING, PUBLISHED, BundleFile, BundleRec, DeltaRec, Device, Due, Fleet, Metric, Store,
                                VersionRec, dumps)

SCHEMA = """
CREATE TABLE IF NOT EXISTS bundles (fingerprint TEXT PRIMARY KEY, manifest TEXT NOT NULL, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS bundle_files (fingerprint TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL,
    size BIGINT NOT NULL, PRIMARY KEY (fingerprint, name));
CREATE TABLE IF NOT EXISTS fleets (name TEXT PRIMARY KEY, bundle TEXT NOT NULL, aggregate_every INTEGER NOT NULL,
    aggregate_minutes DOUBLE PRECISION NOT NULL, staleness INTEGER NOT NULL, robust TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, ranks TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS devices (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, token_hash TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION);
CREATE TABLE IF NOT EXISTS deltas (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, device TEXT NOT NULL, adapter TEXT NOT NULL,
    parent INTEGER NOT NULL, samples BIGINT NOT NULL, size BIGINT NOT NULL, received DOUBLE PRECISION NOT NULL,
    version INTEGER);
CREATE INDEX IF NOT EXISTS deltas_by_version ON deltas (fleet, adapter, version);
CREATE TABLE IF NOT EXISTS delta_content (content TEXT PRIMARY KEY, id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (fleet TEXT NOT NULL, adapter TEXT NOT NULL, version INTEGER NOT NULL,
    state TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, options TEXT NOT NULL, sha256 TEXT, size BIGINT,
    parent INTEGER, report TEXT NOT NULL, PRIMARY KEY (fleet, adapter, version));
CREATE TABLE IF NOT EXISTS metrics (fleet TEXT NOT NULL, device TEXT NOT NULL, name TEXT NOT NULL,
    value DOUBLE PRECISION NOT NULL, version INTEGER, at DOUBLE PRECISION NOT NULL);
CREATE INDEX IF NOT EXISTS metrics_by_fleet ON metrics (fleet, at);
"""

# columns added after a store's first release: (table, column, definition), added to stores made before them
ADDED_COLUMNS = (("fleets", "ranks", "TEXT NOT NULL DEFAULT '[]'"),)

_DELTA_COLS = "id, fleet, device, adapter, parent, samples, size, received, version"
_DELTA_COLS_NEW = "id, fleet, device, adapter, parent, samples, size, received"  # an accepted delta's (version: NULL)
_VERSION_COLS = "fleet, adapter, version, state, created, options, sha256, size, parent, report"


log = logging.getLogger("edgepeft.hub")


def _log_failure(done: Future) -> None:
    if done.exception() is not None:
        log.error("recording last_seen failed: %s", done.exception())


class _SameContent(Exception):
    """Raised inside a transaction to roll back a delta whose content another upload stored first."""


def _version(row: tuple) -> VersionRec:
    f, a, v, state, created, options, sha, size, parent, report = row
    return VersionRec(f, a, v, state, created, json.loads(options), sha, size, parent, json.loads(report))


class SqlStore(Store):
    """Metadata primitives in SQL; blob storage and connections are the backend's.

    Uploads (and last_seen) are written through a group commit (hub/group_commit.py): concurrent writes share one
    transaction, so one fsync (SQLite's WAL, PostgreSQL's commit record) makes a whole batch durable."""

    def __init__(self) -> None:
        super().__init__()
        self._group = GroupCommit(self._tx)

    @abstractmethod
    def _tx(self, write: bool = False) -> contextlib.AbstractContextManager[Any]:
        """A transaction; yields an object with ``execute(sql, params)`` returning a cursor."""

    @abstractmethod
    def _lock_fleet(self, cur: Any, fleet: str) -> None:
        """Serialize version claims of one fleet (inside a write transaction)."""

    @abstractmethod
    def _store_blob(self, cur: Any, sha: str, data: bytes) -> None:
        """Store a blob as part of transaction ``cur`` (or before it, atomically, for file blobs)."""

    def _put_blob(self, sha: str, data: bytes) -> None:
        with self._tx(write=True) as cur:
            self._store_blob(cur, sha, data)

    # ---- bundles ---------------------------------------------------------------------------------

    def _add_bundle(self, rec: BundleRec, blobs: dict[str, bytes]) -> bool:
        with self._tx(write=True) as cur:
            if cur.execute("SELECT 1 FROM bundles WHERE fingerprint = ?", (rec.fingerprint,)).fetchone():
                return False
            for sha, data in blobs.items():
                self._store_blob(cur, sha, data)
            if not cur.execute("INSERT INTO bundles (fingerprint, manifest, created) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                               (rec.fingerprint, rec.manifest_json, rec.created)).rowcount:
                return False
            for f in rec.files:
                cur.execute("INSERT INTO bundle_files (fingerprint, name, sha256, size) VALUES (?, ?, ?, ?)",
                            (rec.fingerprint, f.name, f.sha256, f.size))
            return True

    def _bundles(self, where: str, params: tuple) -> list[BundleRec]:
        with self._tx() as cur:
            rows = cur.execute(f"SELECT fingerprint, manifest, created FROM bundles {where} ORDER BY created", params).fetchall()
            out = []
            for fp, manifest, created in rows:
                files = cur.execute("SELECT name, sha256, size FROM bundle_files WHERE fingerprint = ? ORDER BY name", (fp,)).fetchall()
                out.append(BundleRec(fp, manifest, created, tuple(BundleFile(*f) for f in files)))
            return out

    def get_bundle(self, fingerprint: str) -> BundleRec | None:
        found = self._bundles("WHERE fingerprint = ?", (fingerprint,))
        return found[0] if found else None

    def list_bundles(self) -> list[BundleRec]:
        return self._bundles("", ())

    # ---- fleets and devices ----------------------------------------------------------------------

    def _add_fleet(self, fleet: Fleet) -> bool:
        with self._tx(write=True) as cur:
            return cur.execute("INSERT INTO fleets (name, bundle, aggregate_every, aggregate_minutes, staleness, robust, created, ranks) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                               (fleet.name, fleet.bundle, fleet.aggregate_every, fleet.aggregate_minutes, fleet.staleness,
                                dumps(fleet.robust), fleet.created, dumps(list(fleet.ranks)))).rowcount == 1

    def _fleets(self, where: str, params: tuple) -> list[Fleet]:
        with self._tx() as cur:
            rows = cur.execute("SELECT name, bundle, aggregate_every, aggregate_minutes, staleness, robust, created, ranks "
                               f"FROM fleets {where} ORDER BY name", params).fetchall()
        return [Fleet(n, b, e, m, s, json.loads(r), c, tuple(json.loads(k))) for n, b, e, m, s, r, c, k in rows]

    def get_fleet(self, name: str) -> Fleet | None:
        found = self._fleets("WHERE name = ?", (name,))
        return found[0] if found else None

    def list_fleets(self) -> list[Fleet]:
        return self._fleets("", ())

    def _add_device(self, device: Device) -> bool:
        with self._tx(write=True) as cur:
            return cur.execute("INSERT INTO devices (id, fleet, token_hash, created, last_seen) VALUES (?, ?, ?, ?, ?) "
                               "ON CONFLICT DO NOTHING",
                               (device.id, device.fleet, device.token_hash, device.created, device.last_seen)).rowcount == 1

    def get_device(self, device_id: str) -> Device | None:
        with self._tx() as cur:
            row = cur.execute("SELECT id, fleet, token_hash, created, last_seen FROM devices WHERE id = ?", (device_id,)).fetchone()
        return Device(*row) if row else None

    def list_devices(self, fleet: str | None = None) -> list[Device]:
        where, params = ("WHERE fleet = ?", (fleet,)) if fleet is not None else ("", ())
        with self._tx() as cur:
            rows = cur.execute(f"SELECT id, fleet, token_hash, created, last_seen FROM devices {where} ORDER BY id", params).fetchall()
        return [Device(*r) for r in rows]

    def _set_token_hash(self, device_id: str, token_hash: str) -> bool:
        with self._tx(write=True) as cur:
            return cur.execute("UPDATE devices SET token_hash = ? WHERE id = ?", (token_hash, device_id)).rowcount == 1

    def _touch_device(self, device_id: str, when: float, wait: bool = True) -> None:
        # shares the uploads' group commit where the backend has one
        done = self._write_soon(lambda cur: cur.execute("UPDATE devices SET last_seen = ? WHERE id = ?", (when, device_id)))
        if wait:
            done.result()
        else:
            done.add_done_callback(_log_failure)

    # ---- deltas ----------------------------------------------------------------------------------

    def _blob_in_transaction(self, size: int) -> bool:
        """Whether a blob of ``size`` bytes is written inside the transaction that names it (else: a file, before)."""
        return True

    def _add_delta(self, rec: DeltaRec, data: bytes, content: str | None, token_hash: str | None = None) -> bool:
        return self._add_delta_soon(rec, data, content, token_hash).result()

    def _add_delta_soon(self, rec: DeltaRec, data: bytes, content: str | None, token_hash: str | None = None) -> Future:
        in_tx = self._blob_in_transaction(len(data))
        if not in_tx:
            # the file's fsync is the slowest part of an upload: done outside the lock, uploads fsync in parallel; a
            # blob whose row never commits is unreferenced and harmless, and a row never names a missing blob
            self._store_blob(None, rec.id, data)
        values = (rec.id, rec.fleet, rec.device, rec.adapter, rec.parent, rec.samples, rec.size, rec.received)

        def job(cur: Any) -> bool:
            # one INSERT decides: nothing if the id exists (two hub processes may race on one retried upload: the
            # primary key settles it) or, given token_hash, if the uploader's token was revoked or rotated meanwhile
            if token_hash is None:
                added = cur.execute(f"INSERT INTO deltas ({_DELTA_COLS_NEW}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                                    "ON CONFLICT DO NOTHING", values).rowcount
            else:
                added = cur.execute(f"INSERT INTO deltas ({_DELTA_COLS_NEW}) SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS "
                                    "(SELECT 1 FROM devices WHERE id = ? AND token_hash = ?) ON CONFLICT DO NOTHING",
                                    (*values, rec.device, token_hash)).rowcount
            if not added:
                if token_hash is not None and not cur.execute("SELECT 1 FROM deltas WHERE id = ?", (rec.id,)).fetchone():
                    raise AuthError(f"device {rec.device!r}: its token was revoked or rotated during the upload; "
                                    "nothing was stored (send it again with the current token)")
                return False
            if in_tx:
                self._store_blob(cur, rec.id, data)
            if content is not None and not cur.execute("INSERT INTO delta_content (content, id) VALUES (?, ?) "
                                                       "ON CONFLICT DO NOTHING", (content, rec.id)).rowcount:
                raise _SameContent  # rolls the delta row back: the other upload of this content won
            return True

        added: Future = Future()

        def settle(done: Future) -> None:
            error = done.exception()
            if isinstance(error, _SameContent):
                added.set_result(False)
            elif error is not None:
                added.set_exception(error)
            else:
                added.set_result(bool(done.result()))

        self._write_soon(job).add_done_callback(settle)
        return added

    def _write(self, job: Callable[[Any], Any]) -> Any:
        """``job(cursor)`` committed durably, in a transaction shared with the writes that arrived meanwhile."""
        return self._group.run(job)

    def _write_soon(self, job: Callable[[Any], Any]) -> Future:
        """A future of ``job(cursor)``, set once committed: the calling thread is free during the commit."""
        return self._group.submit(job)

    def find_content(self, content: str) -> DeltaRec | None:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {', '.join('d.' + c for c in _DELTA_COLS.split(', '))} FROM delta_content c "
                              "JOIN deltas d ON d.id = c.id WHERE c.content = ?", (content,)).fetchone()
        return DeltaRec(*row) if row else None

    def get_delta(self, delta_id: str) -> DeltaRec | None:
        with self._tx() as cur:
            row = cur.execute(f"SELECT {_DELTA_COLS} FROM deltas WHERE id = ?", (delta_id,)).fetchone()
        return DeltaRec(*row) if row else None

    def list_deltas(self, fleet: str, adapter: str | None = None, *, version: int | None = None,
                    pending: bool = False) -> list[DeltaRec]:
        where, params = ["fleet = ?"], [fleet]
        if adapter is not None:
            where.append("adapter = ?")
            params.append(adapter)
        if pending:
            where.append("version IS NULL")
        elif version is not None:
            where.append("version = ?")
            params.append(version)
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {_DELTA_COLS} FROM deltas WHERE {' AND '.join(where)} ORDER BY received, id",
                               tuple(params)).fetchall()
        return [DeltaRec(*r) for r in rows]

    # ---- versions --------------------------------------------------------------------------------

    def _claim_version(self, fleet: str, adapter: str, options: dict[str, Any], created: float,
                       take_pending: bool, limit: int | None = None, due: Due | None = None) -> tuple[int, list[str]] | None:
        with self._tx(write=True) as cur:
            self._lock_fleet(cur, fleet)
            ids: list[str] = []
            if take_pending:
                rows = cur.execute("SELECT id, received FROM deltas WHERE fleet = ? AND adapter = ? AND version IS NULL "
                                   "ORDER BY received, id" + (f" LIMIT {int(limit)}" if limit else ""),
                                   (fleet, adapter)).fetchall()
                if not rows or (due is not None and not due.holds(len(rows), rows[0][1])):
                    return None
                ids = [r[0] for r in rows]
            (latest,) = cur.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE fleet = ? AND adapter = ?",
                                    (fleet, adapter)).fetchone()
            version = int(latest) + 1
            cur.execute(f"INSERT INTO versions ({_VERSION_COLS}) VALUES (?, ?, ?, ?, ?, ?, NULL, NULL, NULL, ?)",
                        (fleet, adapter, version, BUILDING, created, dumps(options), "{}"))
            if take_pending and limit:  # the first ``limit`` by arrival (FedBuff's buffer of K), by id
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    cur.execute(f"UPDATE deltas SET version = ? WHERE version IS NULL AND id IN ({', '.join('?' * len(chunk))})",
                                (version, *chunk))
            elif take_pending:
                # rows committed since the SELECT above are claimed too
                cur.execute("UPDATE deltas SET version = ? WHERE fleet = ? AND adapter = ? AND version IS NULL",
                            (version, fleet, adapter))
            if take_pending:
                ids = [r[0] for r in cur.execute("SELECT id FROM deltas WHERE fleet = ? AND adapter = ? AND version = ? "
                                                  "ORDER BY received, id", (fleet, adapter, version)).fetchall()]
            return version, ids

    def _finish_version(self, fleet: str, adapter: str, version: int, data: bytes, sha: str,
                        parent: int | None, report: dict[str, Any]) -> bool:
        with self._tx(write=True) as cur:
            row = cur.execute("SELECT state FROM versions WHERE fleet = ? AND adapter = ? AND version = ?",
                              (fleet, adapter, version)).fetchone()
            if not row or row[0] != BUILDING:
                return False
            self._store_blob(cur, sha, data)
            return cur.execute("UPDATE versions SET state = ?, sha256 = ?, size = ?, parent = ?, report = ? "
                               "WHERE fleet = ? AND adapter = ? AND version = ? AND state = ?",
                               (PUBLISHED, sha, len(data), parent, dumps(report), fleet, adapter, version, BUILDING)).rowcount == 1

    def list_versions(self, fleet: str, adapter: str | None = None, *, state: str | None = PUBLISHED) -> list[VersionRec]:
        where, params = ["fleet = ?"], [fleet]
        if adapter is not None:
            where.append("adapter = ?")
            params.append(adapter)
        if state is not None:
            where.append("state = ?")
            params.append(state)
        with self._tx() as cur:
            rows = cur.execute(f"SELECT {_VERSION_COLS} FROM versions WHERE {' AND '.join(where)} ORDER BY adapter, version",
                               tuple(params)).fetchall()
        return [_version(r) for r in rows]

    def get_version(self, fleet: str, adapter: str, version: int) -> VersionRec | None:
        with self._tx() as cur:  # one row by its key, not every version parsed
            row = cur.execute(f"SELECT {_VERSION_COLS} FROM versions WHERE fleet = ? AND adapter = ? AND version = ?",
                              (fleet, adapter, version)).fetchone()
        return _version(row) if row else None

    def latest_version(self, fleet: str, adapter: str) -> VersionRec | None:
        with self._tx() as cur:  # every upload asks this: one row, not every version's report parsed
            row = cur.execute(f"SELECT {_VERSION_COLS} FROM versions WHERE fleet = ? AND adapter = ? AND state = ? "
                              "ORDER BY version DESC LIMIT 1", (fleet, adapter, PUBLISHED)).fetchone()
        return _version(row) if row else None

    # ---- metrics ---------------------------------------------------------------------------------

    def _add_metrics(self, metrics: list[Metric]) -> None:
        with self._tx(write=True) as cur:
            for m in metrics:
                cur.execute("INSERT INTO metrics (fleet, device, name, value, version, at) VALUES (?, ?, ?, ?, ?, ?)",
                            (m.fleet, m.device, m.name, m.value, m.version, m.at))

    def list_metrics(self, fleet: str, limit: int = 10000) -> list[Metric]:
        with self._tx() as cur:
            rows = cur.execute("SELECT fleet, device, name, value, version, at FROM metrics WHERE fleet = ? "
                               "ORDER BY at DESC LIMIT ?", (fleet, int(limit))).fetchall()
        return [Metric(*r) for r in reversed(rows)]


class Pool:
    """A small thread-safe pool of connections made by ``connect``; broken ones are dropped."""

    def __init__(self, connect: Any, size: int) -> None:
        import queue
        import threading

        self._connect = connect
        self._idle: "queue.LifoQueue[Any]" = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    @contextlib.contextmanager
    def connection(self, broken: tuple[type[BaseException], ...] = ()) -> Iterator[Any]:
        import queue

        self._slots.acquire()
        try:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            except broken:
                with contextlib.suppress(Exception):
                    conn.close()
                raise
            except BaseException:
                self._idle.put(conn)
                raise
            self._idle.put(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        import queue

        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                return
            with contextlib.suppress(Exception):
                conn.close()
