"""The SQLite store's page size: new stores get hub/sqlite_store.PAGE_SIZE, a store made before keeps its own."""

from __future__ import annotations

import sqlite3

import numpy as np

from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta
from edgepeft.hub.sqlite_store import DB_FILE, PAGE_SIZE, SqliteStore
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import read_manifest


def _page_size(root) -> int:
    with sqlite3.connect(root / DB_FILE) as db:
        return db.execute("PRAGMA page_size").fetchone()[0]


def _store_and_read_a_delta(root, bundle_dir) -> tuple[bytes, bytes]:
    """Register the bundle, a fleet and one delta in the store at ``root``: (its bytes as read back, as written)."""
    store = SqliteStore(root)
    try:
        files = {p.name: p.read_bytes() for p in bundle_dir.iterdir()}
        rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
        store.create_fleet("f", rec.fingerprint)
        d = delta_from_init(read_manifest(bundle_dir), 1)
        d.tensors["head.weight"] += np.float32(1)
        data = delta_bytes(replace_meta(d, creator="d1", samples=3))
        assert store.add_delta(DeltaRec(sha256_hex(data), "f", "d1", "default", 0, 3, len(data), 1.0), data)
        return store.delta_bytes(sha256_hex(data)), data
    finally:
        store.close()


def test_a_new_store_is_made_with_the_larger_pages(tmp_path, hub_bundle):
    read, data = _store_and_read_a_delta(tmp_path / "new", hub_bundle)
    assert read == data and _page_size(tmp_path / "new") == PAGE_SIZE != 4096


def test_a_store_made_with_4k_pages_keeps_them_and_works(tmp_path, hub_bundle):
    old = tmp_path / "old"
    old.mkdir()
    with sqlite3.connect(old / DB_FILE) as db:  # what SQLite's default made before PAGE_SIZE existed
        db.execute("PRAGMA page_size=4096")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS inline_blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL)")
    read, data = _store_and_read_a_delta(old, hub_bundle)
    assert read == data and _page_size(old) == 4096
