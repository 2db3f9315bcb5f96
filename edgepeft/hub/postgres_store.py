"""The scale-out store: metadata in PostgreSQL (psycopg 3), shared by several hub processes; blobs there or in a folder.

Blobs live in a ``bytea`` column stored uncompressed out of line (``STORAGE EXTERNAL``), so range
reads are a cheap ``substring``; or, given ``?blobs=DIR``, in a content-addressed folder that every hub process
shares (hub/blob_folder.py). Most of PostgreSQL's CPU per upload is storing the delta as TOAST chunks; the folder
moves that off the one database every hub shares, at the price of two fsyncs per blob in the hub (on two cores
shared by hubs and database it is slower: README's hub section). A marker file ties the folder to the database, so a hub
given a folder that is not the shared one (a local path on another machine) refuses to start instead of losing
blobs. Blobs written before the folder was configured stay readable from the table. Version claims lock the fleet's row (``SELECT ... FOR UPDATE``), so
two processes never put one delta into two aggregations. ``?schema=NAME`` in the URI keeps a store in
its own schema (tests use one per test).
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edgepeft.errors import HubError
from edgepeft import atomic
from edgepeft.hub import blob_folder
from edgepeft.hub.sql_store import ADDED_COLUMNS, SCHEMA, Pool, SqlStore
from edgepeft.hub.store import check_name

BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, data BYTEA NOT NULL);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL;
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""
FOLDER_MARKER = ".edgepeft-store"  # in the blob folder: the id kept in store_meta under FOLDER_KEY
FOLDER_KEY = "blob_folder_id"
SCHEMA_LOCK = 0x6570686  # advisory lock id: hub processes starting together create the schema once


def split_uri(uri: str) -> tuple[str, str | None, Path | None]:
    """(conninfo for psycopg, schema name or None, blob folder or None) from a
    ``postgresql://...[?schema=NAME][&blobs=/abs/dir]`` URI."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    blobs = next((v for k, v in query if k == "blobs"), None)
    if blobs is not None and not blobs.startswith("/"):
        raise HubError(f"blobs={blobs!r} in the store URI: the blob folder needs an absolute path (blobs=/srv/edgepeft-blobs)")
    rest = urlencode([(k, v) for k, v in query if k not in ("schema", "blobs")])
    return (urlunsplit(parts._replace(query=rest)), check_name("schema", schema) if schema is not None else None,
            Path(blobs) if blobs is not None else None)


class _Cursor:
    """``execute`` with ``?`` placeholders on a psycopg connection."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), params)


class PostgresStore(SqlStore):
    """Store in a PostgreSQL database: every table, blobs included."""

    def __init__(self, uri: str, *, pool_size: int = 8) -> None:
        super().__init__()
        try:
            import psycopg
        except ModuleNotFoundError:
            raise HubError('the PostgreSQL store needs psycopg; install it with: pip install "edgepeft[hub]"') from None
        self._psycopg = psycopg
        self._conninfo, self._schema, self._folder = split_uri(uri)
        self._pool = Pool(self._connect, pool_size)
        with self._tx(write=True) as cur:
            cur.execute(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})")
            if self._schema:
                cur.execute(f'CREATE SCHEMA IF NOT EXISTS "{self._schema}"')
                cur.execute(f'SET LOCAL search_path TO "{self._schema}"')
            for stmt in (SCHEMA + ";" + BLOB_SCHEMA).split(";"):
                if stmt.strip():
                    cur.execute(stmt)
            for table, column, definition in ADDED_COLUMNS:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {definition}")
            if self._folder is not None:
                self._tie_folder(cur, self._folder)

    def _tie_folder(self, cur: Any, folder: Path) -> None:
        """Check that ``folder`` is this store's blob folder (the first hub to use one marks it); raise if not."""
        row = cur.execute("SELECT value FROM store_meta WHERE key = ?", (FOLDER_KEY,)).fetchone()
        marker = folder / FOLDER_MARKER
        try:
            folder.mkdir(parents=True, exist_ok=True)
            found = marker.read_text(encoding="utf-8").strip() if marker.is_file() else None
            if row is None:
                store_id = found or secrets.token_hex(16)
                if found is None:
                    atomic.write_text(marker, store_id + "\n")
                cur.execute("INSERT INTO store_meta (key, value) VALUES (?, ?)", (FOLDER_KEY, store_id))
                return
        except OSError as e:
            raise HubError(f"{folder}: cannot use it as the blob folder ({e.strerror})") from None
        if found != row[0]:
            why = "missing" if found is None else "another store's"
            raise HubError(f"{folder}: not this store's blob folder (its marker {FOLDER_MARKER} is {why}); every hub "
                           "process of a store needs the same shared folder: mount it at this path, or give the path "
                           "the other hubs use")

    def _connect(self) -> Any:
        try:
            conn = self._psycopg.connect(self._conninfo, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as e:
            raise HubError(f"cannot connect to PostgreSQL ({str(e).strip().splitlines()[0][:200]})") from None
        if self._schema:
            conn.execute(f'SET search_path TO "{self._schema}"')
        return conn

    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Any]:
        with self._pool.connection(broken=(self._psycopg.OperationalError, self._psycopg.InterfaceError)) as conn:
            if not write:
                # reads run in autocommit: under READ COMMITTED each statement takes its own snapshot inside a
                # transaction too, so BEGIN and COMMIT would add two round trips (a third of an upload's read) and
                # nothing a read can see
                yield _Cursor(conn)
                return
            with conn.transaction():
                yield _Cursor(conn)

    def _lock_fleet(self, cur: Any, fleet: str) -> None:
        cur.execute("SELECT 1 FROM fleets WHERE name = ? FOR UPDATE", (fleet,))

    def _blob_in_transaction(self, size: int) -> bool:
        return self._folder is None  # a folder's blob is written (and fsynced) before the transaction, in parallel

    def _store_blob(self, cur: Any, sha: str, data: bytes) -> None:
        if self._folder is not None:
            blob_folder.write_blob(self._folder, sha, data)
            return
        cur.execute("INSERT INTO blobs (sha256, size, data) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (sha, len(data), data))

    def _read_blob(self, sha: str, start: int, length: int | None) -> bytes | None:
        if self._folder is not None and (data := blob_folder.read_blob(self._folder, sha, start, length)) is not None:
            return data
        with self._tx() as cur:  # in the table: no folder, or a blob stored before the folder was configured
            if length is None:
                row = cur.execute("SELECT substring(data FROM ?::int) FROM blobs WHERE sha256 = ?", (start + 1, sha)).fetchone()
            else:
                row = cur.execute("SELECT substring(data FROM ?::int FOR ?::int) FROM blobs WHERE sha256 = ?",
                                  (start + 1, length, sha)).fetchone()
        return None if row is None else bytes(row[0])

    def _read_blobs(self, shas: list[str]) -> dict[str, bytes]:
        if self._folder is not None:  # the rest (older blobs in the table) are read one by one
            found = {sha: blob_folder.read_blob(self._folder, sha) for sha in shas}
            return {sha: data for sha, data in found.items() if data is not None}
        with self._tx() as cur:
            rows = cur.execute(f"SELECT sha256, data FROM blobs WHERE sha256 IN ({','.join('?' * len(shas))})", shas).fetchall()
        return {sha: bytes(data) for sha, data in rows}

    def close(self) -> None:
        self._group.close()
        self._pool.close()
