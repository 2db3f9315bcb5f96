"""``hub serve --workers N``: N hub processes on one port and one store, as uvicorn's workers.

uvicorn starts each worker as a fresh (spawned) process that imports its app, so the app comes from a factory here
(:func:`app_from_env`) and the serve options reach it through one environment variable (:data:`ENV`), JSON, never
holding the admin token itself (only the file it is in). Each worker opens its own store; what one process does alone
stays correct with several on one store because every cross-request guarantee lives in the database, not in memory:
a version claim runs in a write transaction that serializes claims of all processes (SQLite's ``BEGIN IMMEDIATE``
takes the database's one write lock, PostgreSQL locks the fleet's row), an upload's INSERT names the token hash it
authenticated with (a token revoked through any worker uploads nothing at once; other reads may answer from a
worker's cache for ``auth_cache.TTL_S``), and a retried upload is settled by the delta's primary key.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI

ENV = "EDGEPEFT_HUB_WORKER"  # JSON of WorkerOptions, set by ``hub serve`` for its workers


@dataclass(frozen=True)
class WorkerOptions:
    """What ``hub serve`` passes each worker: the store, where the admin token is, and the app's options."""

    store_uri: str
    admin_token_file: str
    max_upload_bytes: int
    policy_interval_s: float
    request_threads: int
    status_public: bool
    merge_threads: int = 0  # aggregate.MERGE_THREADS (0: every core)

    def to_env(self) -> str:
        """The value of :data:`ENV` for these options."""
        return json.dumps(asdict(self))


def app_from_env() -> FastAPI:
    """The hub app of one worker (uvicorn's ``factory``): its own store, closed when the worker stops."""
    from edgepeft.hub.app import create_app
    from edgepeft.hub.backends import open_store
    from edgepeft.hub.local import die_with_parent

    if sys.platform == "linux":  # a worker whose supervisor was killed stops too, instead of holding the port alone
        die_with_parent()
    opts = WorkerOptions(**json.loads(os.environ[ENV]))
    from edgepeft.hub import aggregate

    aggregate.MERGE_THREADS = opts.merge_threads or None
    token = Path(opts.admin_token_file).read_text(encoding="utf-8").strip()
    return create_app(open_store(opts.store_uri), admin_token=token, max_upload_bytes=opts.max_upload_bytes,
                      policy_interval_s=opts.policy_interval_s, request_threads=opts.request_threads,
                      status_public=opts.status_public, close_store=True)
