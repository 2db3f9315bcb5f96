"""Which store backend a URI names. Lives apart from ``store.py`` so the interface never imports its backends."""

from __future__ import annotations

from edgepeft.errors import HubError
from edgepeft.hub.postgres_store import PostgresStore
from edgepeft.hub.sqlite_store import SqliteStore
from edgepeft.hub.store import Store


def open_store(uri: str) -> Store:
    """Open the store named by ``uri``: ``sqlite:///dir``, a plain directory path, or ``postgresql://...``."""
    if uri.startswith(("postgresql://", "postgres://")):
        return PostgresStore(uri)
    if uri.startswith("sqlite://"):
        uri = uri[len("sqlite://"):]
        if not uri.startswith("/"):
            raise HubError(f"sqlite store URI needs an absolute path (sqlite:///path/dir), got sqlite://{uri}")
    elif "://" in uri:
        raise HubError(f"unknown store URI scheme in {uri!r}; use sqlite:///dir, a directory, or postgresql://...")
    return SqliteStore(uri)
