"""The hub's FastAPI app: ``create_app(store, admin_token=..., ...)``.

The store is injected (``auth.get_store``; tests may swap it through ``app.dependency_overrides``).
On start the app finishes versions a dead process left ``building``; a ticker applies each fleet's
time-based aggregation policy, and every accepted upload checks the count-based one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, AsyncIterator

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from edgepeft import __version__
from edgepeft.errors import DeltaError, HubError
from edgepeft.hub import aggregate as agg
from edgepeft.hub import api_admin, api_device
from edgepeft.hub.auth import PrincipalDep, StoreDep
from edgepeft.hub.store import hash_token
from edgepeft.hub.status import render_status
from edgepeft.hub.store import Store

log = logging.getLogger("edgepeft.hub")

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_BUNDLE_BYTES = 4 * 2**30


def create_app(store: Store, *, admin_token: str, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_bundle_bytes: int = MAX_BUNDLE_BYTES, policy_interval_s: float = 30.0,
               status_public: bool = False) -> FastAPI:
    """The hub app over ``store``; ``admin_token`` guards admin calls (kept only as its sha256)."""
    if len(admin_token) < 16:
        raise HubError("the admin token must be at least 16 characters")
    if max_upload_bytes < 1 or max_bundle_bytes < 1:
        raise HubError("upload limits must be positive")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(_recover, app)
        ticker = asyncio.create_task(_tick(app, policy_interval_s)) if policy_interval_s > 0 else None
        yield
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    app = FastAPI(title="edgepeft hub", version=__version__, lifespan=lifespan,
                  description="Stores, validates and aggregates fleet deltas; publishes adapter versions devices pull.")
    app.state.store = store
    app.state.admin_hash = hash_token(admin_token)
    app.state.max_upload_bytes = int(max_upload_bytes)
    app.state.max_bundle_bytes = int(max_bundle_bytes)
    app.state.manifests = {}
    app.state.aggregate_lock = threading.Lock()  # one merge at a time per process; claims are atomic anyway
    app.state.policy = lambda fleet, adapter: _policy(app, fleet, adapter)
    app.include_router(api_admin.router, tags=["admin"])
    app.include_router(api_device.router, tags=["device"])

    @app.exception_handler(HubError)
    async def _hub_error(request: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422 if isinstance(exc, DeltaError) else 400)

    @app.exception_handler(DeltaError)
    async def _delta_error(request: Request, exc: DeltaError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/healthz", tags=["status"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    if status_public:
        @app.get("/", tags=["status"], response_class=HTMLResponse, summary="Status page (public)")
        def status_open(store: StoreDep) -> HTMLResponse:
            return HTMLResponse(render_status(store))
    else:
        @app.get("/", tags=["status"], response_class=HTMLResponse,
                 summary="Status page (admin token as bearer, or ?token= for a browser)")
        def status_page(who: PrincipalDep, store: StoreDep) -> HTMLResponse:
            if not who.admin:
                raise HTTPException(403, "the status page needs the admin token")
            return HTMLResponse(render_status(store))

    return app


def _store(app: FastAPI) -> Store:
    from edgepeft.hub.auth import get_store

    override = app.dependency_overrides.get(get_store)
    return override() if override is not None else app.state.store


def _policy(app: FastAPI, fleet: str, adapter: str) -> Any:
    """Aggregate if the fleet's policy is due; errors are logged, the deltas stay pending."""
    try:
        with app.state.aggregate_lock:
            return agg.maybe_aggregate(_store(app), fleet, adapter)
    except (HubError, DeltaError) as e:
        log.error("aggregation of %s/%s failed: %s", fleet, adapter, e)
        return None


def _recover(app: FastAPI) -> None:
    try:
        with app.state.aggregate_lock:
            for v in agg.recover(_store(app)):
                log.warning("finished version %s/%s v%d left building by a stopped hub", v.fleet, v.adapter, v.version)
    except (HubError, DeltaError) as e:
        log.error("recovery failed: %s", e)


async def _tick(app: FastAPI, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        store = _store(app)
        try:
            fleets = await run_in_threadpool(store.list_fleets)
            for f in fleets:
                if not f.aggregate_minutes:
                    continue
                adapters = {d.adapter for d in await run_in_threadpool(store.list_deltas, f.name, None, pending=True)}
                for a in sorted(adapters):
                    await run_in_threadpool(_policy, app, f.name, a)
        except Exception as e:  # noqa: BLE001 - the ticker must outlive a database hiccup
            log.error("policy ticker: %s", e)
