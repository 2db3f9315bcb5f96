"""The scale-out store: metadata and blobs in PostgreSQL (psycopg 3), shared by several hub processes.

Blobs live in a ``bytea`` column stored uncompressed out of line (``STORAGE EXTERNAL``), so range
reads are a cheap ``substring``. Version claims lock the fleet's row (``SELECT ... FOR UPDATE``), so
two processes never put one delta into two aggregations. ``?schema=NAME`` in the URI keeps a store in
its own schema (tests use one per test).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from edgepeft.errors import HubError
from edgepeft.hub.sql_store import ADDED_COLUMNS, SCHEMA, Pool, SqlStore
from edgepeft.hub.store import check_name

BLOB_SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (sha256 TEXT PRIMARY KEY, size BIGINT NOT NULL, data BYTEA NOT NULL);
ALTER TABLE blobs ALTER COLUMN data SET STORAGE EXTERNAL
"""
SCHEMA_LOCK = 0x6570686  # advisory lock id: hub processes starting together create the schema once


def split_uri(uri: str) -> tuple[str, str | None]:
    """(conninfo for psycopg, schema name or None) from a ``postgresql://...[?schema=NAME]`` URI."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), (check_name("schema", schema) if schema is not None else None)


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
        self._conninfo, self._schema = split_uri(uri)
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

    def _store_blob(self, cur: Any, sha: str, data: bytes) -> None:
        cur.execute("INSERT INTO blobs (sha256, size, data) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (sha, len(data), data))

    def _read_blob(self, sha: str, start: int, length: int | None) -> bytes | None:
        with self._tx() as cur:
            if length is None:
                row = cur.execute("SELECT substring(data FROM ?::int) FROM blobs WHERE sha256 = ?", (start + 1, sha)).fetchone()
            else:
                row = cur.execute("SELECT substring(data FROM ?::int FOR ?::int) FROM blobs WHERE sha256 = ?",
                                  (start + 1, length, sha)).fetchone()
        return None if row is None else bytes(row[0])

    def _read_blobs(self, shas: list[str]) -> dict[str, bytes]:
        with self._tx() as cur:
            rows = cur.execute(f"SELECT sha256, data FROM blobs WHERE sha256 IN ({','.join('?' * len(shas))})", shas).fetchall()
        return {sha: bytes(data) for sha, data in rows}

    def close(self) -> None:
        self._group.close()
        self._pool.close()
