"""A PostgreSQL store with ``?blobs=DIR`` keeps blobs in a shared folder, refuses a folder that is not its own, and
still reads the blobs stored in the database before the folder was configured."""

from __future__ import annotations

import uuid

import pytest

from edgepeft.errors import HubError
from edgepeft.hub.backends import open_store
from edgepeft.hub.blob_folder import blob_path
from edgepeft.hub.postgres_store import FOLDER_MARKER, split_uri


@pytest.fixture
def pg_uri(postgres_dsn):
    schema = "t" + uuid.uuid4().hex[:12]
    yield f"{postgres_dsn}?schema={schema}"
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def _rows_in_blob_table(store) -> int:
    with store._tx() as cur:
        return cur.execute("SELECT count(*) FROM blobs").fetchone()[0]


def test_a_blob_goes_to_the_folder_and_not_the_database(pg_uri, tmp_path):
    store = open_store(f"{pg_uri}&blobs={tmp_path / 'blobs'}")
    try:
        sha = store.put_blob(b"hello world")
        assert blob_path(tmp_path / "blobs", sha).read_bytes() == b"hello world"
        assert _rows_in_blob_table(store) == 0
        assert store.read_blob(sha, 6, 5) == b"world"
    finally:
        store.close()


def test_a_second_hub_given_another_folder_refuses_to_start(pg_uri, tmp_path):
    open_store(f"{pg_uri}&blobs={tmp_path / 'shared'}").close()
    with pytest.raises(HubError, match="not this store's blob folder.*missing"):
        open_store(f"{pg_uri}&blobs={tmp_path / 'local'}")
    open_store(f"{pg_uri}&blobs={tmp_path / 'shared'}").close()  # the shared one still opens
    assert (tmp_path / "shared" / FOLDER_MARKER).is_file()


def test_blobs_stored_in_the_database_stay_readable_once_a_folder_is_configured(pg_uri, tmp_path):
    before = open_store(pg_uri)
    try:
        sha = before.put_blob(b"stored in the table")
    finally:
        before.close()
    after = open_store(f"{pg_uri}&blobs={tmp_path / 'blobs'}")
    try:
        assert after.get_blob(sha) == b"stored in the table"
        assert dict(after.iter_delta_bytes([sha])) == {sha: b"stored in the table"}
    finally:
        after.close()


def test_a_relative_blob_folder_is_refused_with_the_fix():
    with pytest.raises(HubError, match="absolute path"):
        split_uri("postgresql://hub@db/edgepeft?blobs=relative/dir")
