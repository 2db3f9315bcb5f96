"""The hub's FastAPI app: ``create_app(store, admin_token=..., ...)``.

The store is injected (``auth.get_store``; tests may swap it through ``app.dependency_overrides``).
On start the app finishes versions a dead process left ``building``; a ticker applies each fleet's
time-based aggregation policy, and every accepted upload checks the count-based one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, AsyncIterator

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from edgepeft import __version__
from edgepeft.errors import DeltaError, EdgePeftError, HubError
from edgepeft.hub import REQUEST_THREADS
from edgepeft.hub import aggregate as agg
from edgepeft.hub import api_admin, api_device
from edgepeft.hub.auth import SESSION_COOKIE, SESSION_MAX_AGE_S, StoreDep, bearer, may_see_status, status_session
from edgepeft.hub.bodies import read_body
from edgepeft.hub.http_errors import http_status
from edgepeft.hub.lean_upload import LeanUpload
from edgepeft.hub.status import login_page, render_status
from edgepeft.hub.store import Store, hash_token

log = logging.getLogger("edgepeft.hub")

MAX_UPLOAD_BYTES = 16 * 2**20
MAX_BUNDLE_BYTES = 4 * 2**30


def create_app(store: Store, *, admin_token: str, max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_bundle_bytes: int = MAX_BUNDLE_BYTES, policy_interval_s: float = 30.0,
               status_public: bool = False, request_threads: int = REQUEST_THREADS, lean_upload: bool = True,
               close_store: bool = False) -> FastAPI:
    """The hub app over ``store``; ``admin_token`` guards admin calls (kept only as its sha256). ``lean_upload``:
    uploads are answered by hub/lean_upload.py ahead of FastAPI's layers (False: by the FastAPI route, same handler).
    ``close_store``: the app owns the store and closes it when it stops (a worker process, hub/workers.py)."""
    if len(admin_token) < 16:
        raise HubError("the admin token must be at least 16 characters")
    if max_upload_bytes < 1 or max_bundle_bytes < 1:
        raise HubError("upload limits must be positive")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = request_threads
        app.state.upload_threads = _upload_threads(request_threads)
        await run_in_threadpool(_recover, app)
        ticker = asyncio.create_task(_tick(app, policy_interval_s)) if policy_interval_s > 0 else None
        yield
        app.state.upload_threads.shutdown(wait=True)
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if close_store:
            store.close()

    app = FastAPI(title="edgepeft hub", version=__version__, lifespan=lifespan,
                  description="Stores, validates and aggregates fleet deltas; publishes adapter versions devices pull.")
    app.state.store = store
    app.state.admin_hash = hash_token(admin_token)
    app.state.session = status_session(admin_token)
    app.state.session_hash = hash_token(app.state.session)
    app.state.max_upload_bytes = int(max_upload_bytes)
    app.state.max_bundle_bytes = int(max_bundle_bytes)
    app.state.manifests = {}
    app.state.upload_threads = _upload_threads(request_threads)  # replaced by the lifespan's own, shut down after it
    app.state.aggregate_lock = threading.Lock()  # one merge at a time per process; claims are atomic anyway
    app.state.policy = lambda fleet, adapter: _policy(app, fleet, adapter)
    app.include_router(api_admin.router, tags=["admin"])
    app.include_router(api_device.router, tags=["device"])
    if lean_upload:
        app.add_middleware(LeanUpload)

    @app.exception_handler(EdgePeftError)
    async def _edgepeft_error(request: Request, exc: EdgePeftError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=http_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer echoes the input, which may not even be JSON (NaN): one line per problem instead
        return JSONResponse({"detail": "; ".join(_problem(e) for e in exc.errors()[:5])}, status_code=422)

    @app.get("/healthz", tags=["status"], summary="Liveness")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    _status_routes(app, status_public)
    return app


def _upload_threads(n: int) -> ThreadPoolExecutor:
    """The threads that check and accept uploads (api_device.upload_delta), as many as the request threads."""
    return ThreadPoolExecutor(n, thread_name_prefix="edgepeft-upload")


def _problem(error: dict[str, Any]) -> str:
    """One line for one validation error: where (``body.values.loss``) and what is wrong, never the input."""
    where = ".".join(str(p) for p in error.get("loc", ()))[:120]
    return f"{where}: {str(error.get('msg', 'invalid'))[:200]}"


def _status_routes(app: FastAPI, public: bool) -> None:
    """``/``: the status page, for the admin bearer or the session cookie its login form sets (public: for all)."""

    @app.get("/", tags=["status"], response_class=HTMLResponse, summary="Status page (admin bearer or login cookie)")
    def status_page(request: Request, store: StoreDep,
                    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> HTMLResponse:
        if public or may_see_status(request, creds):
            return HTMLResponse(render_status(store))
        return HTMLResponse(login_page(), status_code=401)

    @app.post("/login", tags=["status"], response_class=HTMLResponse, include_in_schema=False)
    async def login(request: Request) -> Response:
        body = await read_body(request, 4096)
        fields = urllib.parse.parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=4)
        token = (fields.get("token") or [""])[0]
        if not hmac.compare_digest(hash_token(token), request.app.state.admin_hash):
            return HTMLResponse(login_page("wrong token"), status_code=401)
        r = RedirectResponse("/", status_code=303)
        r.set_cookie(SESSION_COOKIE, request.app.state.session, max_age=SESSION_MAX_AGE_S, httponly=True,
                     samesite="strict", secure=request.url.scheme == "https", path="/")
        return r

    @app.post("/logout", tags=["status"], include_in_schema=False)
    def logout() -> Response:
        r = RedirectResponse("/", status_code=303)
        r.delete_cookie(SESSION_COOKIE, path="/")
        return r


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
