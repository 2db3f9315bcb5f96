"""The embedded store: SQLite in WAL mode for metadata, a content-addressed folder for blobs.

Layout of the store directory: ``hub.sqlite3`` and ``blobs/<2 hex>/<64 hex>``. A blob file is written
atomically (temp, fsync, rename) before the row that names it commits, so a row never points at a
missing or partial blob; a crash in between leaves an unreferenced blob, which is harmless.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator

from edgepeft import atomic
from edgepeft.errors import HubError
from edgepeft.hub.group_commit import GroupCommit
from edgepeft.hub.sql_store import ADDED_COLUMNS, SCHEMA, Pool, SqlStore
from edgepeft.hub.store import check_sha

DB_FILE = "hub.sqlite3"
BLOB_DIR = "blobs"


class SqliteStore(SqlStore):
    """Store in one directory: SQLite (WAL) + blob files named by sha256."""

    def __init__(self, root: str | os.PathLike, *, pool_size: int = 8) -> None:
        self.root = Path(os.fspath(root))
        try:
            (self.root / BLOB_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise HubError(f"{self.root}: cannot create the store directory ({e.strerror})") from None
        self._db = self.root / DB_FILE
        self._pool = Pool(self._connect, pool_size)
        self._group = GroupCommit(self._tx)
        with self._tx(write=True) as cur:
            for stmt in SCHEMA.split(";"):
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
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # an acknowledged upload survives a power cut
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Any]:
        with self._pool.connection() as conn:
            # IMMEDIATE takes the write lock up front, so concurrent writers queue instead of deadlocking
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    blobs_in_transaction = False  # blob files are written and fsynced before BEGIN IMMEDIATE (see SqlStore._add_delta)

    def _write(self, job: Any) -> Any:
        return self._group.run(job)  # concurrent uploads share a commit: one WAL fsync per batch (hub/group_commit.py)

    def _lock_fleet(self, cur: Any, fleet: str) -> None:
        pass  # BEGIN IMMEDIATE already serializes every writer

    def _blob_path(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / BLOB_DIR / sha[:2] / sha

    def _store_blob(self, cur: Any, sha: str, data: bytes) -> None:
        path = self._blob_path(sha)
        if not path.exists():
            atomic.write_bytes(path, data)

    def _read_blob(self, sha: str, start: int, length: int | None) -> bytes | None:
        try:
            with open(self._blob_path(sha), "rb") as f:
                f.seek(start)
                return f.read() if length is None else f.read(length)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        self._pool.close()
