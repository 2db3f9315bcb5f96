"""A content-addressed blob folder: ``<root>/<2 hex>/<64 hex>``, each blob written atomically (temp, fsync, rename).

The SQLite store keeps its large blobs here; a PostgreSQL store given ``?blobs=DIR`` keeps every blob here (a folder
all its hub processes share), so the database holds metadata only. A blob is written before the row naming it
commits: a row never points at a missing or partial blob, and a crash in between leaves an unreferenced file.
"""

from __future__ import annotations

from pathlib import Path

from edgepeft import atomic
from edgepeft.hub.store import check_sha


def blob_path(root: Path, sha: str) -> Path:
    """Where the blob ``sha`` lives under ``root``."""
    check_sha(sha)
    return root / sha[:2] / sha


def write_blob(root: Path, sha: str, data: bytes) -> None:
    """Store ``data`` as ``sha`` unless it is there already (same name, same bytes: content-addressed)."""
    path = blob_path(root, sha)
    if not path.exists():
        atomic.write_bytes(path, data)


def read_blob(root: Path, sha: str, start: int = 0, length: int | None = None) -> bytes | None:
    """``length`` bytes of blob ``sha`` from ``start`` (all the rest when None); None when there is no such blob."""
    try:
        with open(blob_path(root, sha), "rb") as f:
            f.seek(start)
            return f.read() if length is None else f.read(length)
    except FileNotFoundError:
        return None
