"""The embedded store: SQLite in WAL mode for metadata and small blobs, a content-addressed folder for large ones.

Layout of the store directory: ``hub.sqlite3`` and ``blobs/<2 hex>/<64 hex>``. A blob of at most
``INLINE_MAX`` bytes (every delta and version of a small model) is a row of the ``inline_blobs`` table,
written in the same transaction as the row that names it: concurrent uploads then share one WAL fsync
(hub/group_commit.py) instead of paying two fsyncs each for a file and its directory. A larger blob (bundle weights) is a file written
atomically (temp, fsync, rename) before the row that names it commits, so a row never points at a missing
or partial blob; a crash in between leaves an unreferenced file, which is harmless.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterator

from edgepeft.errors import HubError
from edgepeft.hub import blob_folder
from edgepeft.hub.sql_store import ADDED_COLUMNS, SCHEMA, Pool, SqlStore

try:
    import fcntl
except ImportError:  # not POSIX: one process per store, its threads serialized by the thread lock
    fcntl = None  # type: ignore[assignment]

DB_FILE = "hub.sqlite3"
BLOB_DIR = "blobs"
INLINE_MAX = 1 << 20  # SQLite reads and writes blobs below ~100 KB faster than files (sqlite.org/intern-v-extern-blob.html)
# pages of a store made from now on (an older store keeps the 4 KiB it was made with, and works as before): a 94 KB
# packed delta spans 3 pages, not 23, and committing it costs about half the CPU (0.19 against 0.36 ms a delta,
# benchmarks/results/hub_profile.json); 64 KiB did no better in a one-off run, and small rows read less of 32 KiB
PAGE_SIZE = 32768
INLINE_SCHEMA = "CREATE TABLE IF NOT EXISTS inline_blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL)"
WRITER_LOCK_FILE = "hub.sqlite3.writer"


class WriterLock:
    """The store's one writer at a time, across threads and processes, handed over by the kernel, not found by polling.

    SQLite lets one connection write at a time; one that finds the lock taken sleeps in its busy handler (1, 2, 5, 10,
    ... up to 100 ms between tries) and may find it taken again. With several hub processes on one store
    (``hub serve --workers``) each process's group commit writes back to back, so the other's waits piled up (two
    hubs on one store, bench_hub's 1,536 uploads, load average 6: p99 446 and 644 ms in two runs without this lock,
    269 and 239 ms with it, at the same hub CPU per upload). A blocking ``flock`` on a file beside the database (and a thread lock, since
    ``flock`` is held per open file, not per thread) wakes the next writer as soon as the last one commits; SQLite's
    own locking still guards the data, and its busy timeout still covers a writer that does not take this lock.
    """

    def __init__(self, path: Path) -> None:
        self._thread = threading.Lock()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """The lock, for one write transaction."""
        with self._thread:
            if fcntl is None:
                yield
                return
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class SqliteStore(SqlStore):
    """Store in one directory: SQLite (WAL) + blob files named by sha256."""

    def __init__(self, root: str | os.PathLike, *, pool_size: int = 8) -> None:
        super().__init__()
        self.root = Path(os.fspath(root))
        try:
            (self.root / BLOB_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HubError(f"{self.root}: cannot create the store directory ({e.strerror})") from None
        self._db = self.root / DB_FILE
        self._writer = WriterLock(self.root / WRITER_LOCK_FILE)
        self._pool = Pool(self._connect, pool_size)
        with self._tx(write=True) as cur:
            for stmt in (*SCHEMA.split(";"), INLINE_SCHEMA):
                if stmt.strip():
                    cur.execute(stmt)
            for table, column, definition in ADDED_COLUMNS:
                if column not in {row[1] for row in cur.execute(f"PRAGMA table_info({table})")}:
                    cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._db, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as e:
            raise HubError(f"{self._db}: cannot open ({e})") from None
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # takes effect only in a new, empty database (before WAL mode)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an acknowledged upload survives a power cut
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Any]:
        with self._pool.connection() as conn, (self._writer.held() if write else contextlib.nullcontext()):
            # IMMEDIATE takes the write lock up front, so concurrent writers queue instead of deadlocking
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _blob_in_transaction(self, size: int) -> bool:
        return size <= INLINE_MAX  # a larger blob is a file, written and fsynced before BEGIN IMMEDIATE

    def _lock_fleet(self, cur: Any, fleet: str) -> None:
        pass  # BEGIN IMMEDIATE already serializes every writer

    def _store_blob(self, cur: Any, sha: str, data: bytes) -> None:
        if cur is not None and self._blob_in_transaction(len(data)):
            cur.execute("INSERT INTO inline_blobs (sha256, data) VALUES (?, ?) ON CONFLICT DO NOTHING", (sha, bytes(data)))
            return
        blob_folder.write_blob(self.root / BLOB_DIR, sha, data)

    def _read_blob(self, sha: str, start: int, length: int | None) -> bytes | None:
        with self._tx() as cur:  # substr counts from 1
            row = cur.execute("SELECT substr(data, ?, ?) FROM inline_blobs WHERE sha256 = ?",
                              (start + 1, INLINE_MAX if length is None else length, sha)).fetchone()
        if row is not None:
            return bytes(row[0])
        return blob_folder.read_blob(self.root / BLOB_DIR, sha, start, length)

    def _read_blobs(self, shas: list[str]) -> dict[str, bytes]:
        with self._tx() as cur:
            rows = cur.execute(f"SELECT sha256, data FROM inline_blobs WHERE sha256 IN ({','.join('?' * len(shas))})",
                               shas).fetchall()
        return {sha: bytes(data) for sha, data in rows}

    def close(self) -> None:
        self._group.close()
        self._pool.close()
        self._writer.close()
