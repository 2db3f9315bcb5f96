"""Device endpoints: who am I, upload a delta, list and download the fleet's adapter versions, report metrics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.background import BackgroundTask
from pydantic import BaseModel, Field

from edgepeft.delta.format import max_file_bytes
from edgepeft.delta.ranks import bundle_rank
from edgepeft.hub import accept
from edgepeft.hub.auth import DeviceDep, PrincipalDep, StoreDep, get_store
from edgepeft.hub.bodies import read_body
from edgepeft.hub.bundles import serve_blob
from edgepeft.hub.store import Store, VersionRec

router = APIRouter(prefix="/api/v1")
UPLOAD_PATH = "/devices/{device_id}/deltas"  # served by hub/lean_upload.py ahead of FastAPI; this route documents it
MAX_VERSION = 10**9 - 1  # version numbers fit nine digits and every database integer

BINARY_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}}}


def version_json(v: VersionRec, *, with_report: bool = True) -> dict[str, Any]:
    """What clients see of a version."""
    packed = v.report.get("packed") or {}
    out = {"fleet": v.fleet, "adapter": v.adapter, "version": v.version, "state": v.state, "sha256": v.sha256,
           "size": v.size, "packed_sha256": packed.get("sha256"), "packed_size": packed.get("size"),
           "parent": v.parent, "created": v.created}
    if with_report:
        out["report"] = v.report
    return out


MetricName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")]
MetricValue = Annotated[float, Field(allow_inf_nan=False, ge=-1e15, le=1e15)]


class MetricsIn(BaseModel):
    """Metric values a device reports, optionally for the adapter version it ran."""

    values: dict[MetricName, MetricValue] = Field(max_length=64)
    version: int | None = Field(None, ge=0, le=MAX_VERSION)


@router.get("/device", summary="The calling device: its fleet, bundle and latest adapter versions")
def whoami(who: DeviceDep, store: StoreDep) -> dict[str, Any]:
    d = who.device
    fleet = store.get_fleet(d.fleet)
    latest: dict[str, int] = {}
    for v in store.list_versions(d.fleet):
        latest[v.adapter] = max(latest.get(v.adapter, 0), v.version)
    return {"device": d.id, "fleet": d.fleet, "bundle": fleet.bundle if fleet else None, "latest": latest}


@router.post("/device/token", status_code=201, summary="Rotate the calling device's own token (the old one stops working)")
def rotate_own_token(who: DeviceDep, store: StoreDep) -> dict[str, str]:
    return {"device": who.device.id, "fleet": who.device.fleet, "token": store.rotate_token(who.device.id)}


@router.post(UPLOAD_PATH, status_code=201,
             summary="Upload a delta (safetensors or packed); idempotent by sha256",
             openapi_extra={**BINARY_BODY, "security": [{"HTTPBearer": []}]},
             responses={200: {"description": "already stored (a retry)"}, 403: {"description": "not this device"},
                        409: {"description": "stale parent, or the delta's method or method config is not the fleet's"}, 413: {"description": "too large"},
                        422: {"description": "invalid delta"},
                        503: {"description": "the device's fleet or its bundle is missing from the store (the admin restores it)"}})
async def upload_delta(device_id: str, request: Request) -> Response:
    # no FastAPI dependencies here (solving them cost more CPU than the rest of the route): the bearer token is read
    # as auth.bearer reads it, the store as auth.get_store gives it, and the OpenAPI security entry is stated above
    token = _bearer_token(request)
    store = _store_of(request)
    # one thread hop per upload: a device seen before is authenticated from memory on the event loop, the body is read
    # there, and one worker call validates and accepts (the first upload of a process looks the device up first)
    who = accept.uploader(request, store, token, device_id, memory_only=True)
    if who is None:
        who = await run_in_threadpool(accept.uploader, request, store, token, device_id)
    # the bundle fixes the largest valid delta: nothing bigger is even read
    data = await read_body(request, min(request.app.state.max_upload_bytes, max_file_bytes(who.manifest)))
    # the hop itself through asyncio's executor, not anyio's to_thread (its cancel scope and limiter cost more CPU
    # than the hop): the app's upload threads, as many as its request threads
    loop = asyncio.get_running_loop()
    answer = await loop.run_in_executor(request.app.state.upload_threads, accept.start, store, who.device, data,
                                        who.manifest, who.token_hash)
    if isinstance(answer, accept.Pending):  # the worker thread is free while the commit holding the delta runs
        added = await asyncio.wrap_future(answer.added)
        answer = answer.stored() if added else await run_in_threadpool(answer.not_stored)
    status, body = answer
    # the fleet's count-based policy is asked only if it has one: no thread hop per upload otherwise
    policy = None
    if status == 201 and (who.fleet.aggregate_every or who.fleet.aggregate_minutes):
        policy = BackgroundTask(request.app.state.policy, who.device.fleet, body["adapter"])
    return JSONResponse(body, status_code=status, background=policy)


def _bearer_token(request: Request) -> str | None:
    """The credentials of an ``Authorization: Bearer`` header, as ``auth.bearer`` (HTTPBearer) reads them."""
    scheme, credentials = get_authorization_scheme_param(request.headers.get("authorization"))
    return credentials if scheme.lower() == "bearer" and credentials else None


def _store_of(request: Request) -> Store:
    """The store ``auth.get_store`` gives a route (a test's ``dependency_overrides`` included)."""
    override = request.app.dependency_overrides.get(get_store)
    return override() if override is not None else request.app.state.store


@router.post("/devices/{device_id}/metrics", status_code=201, summary="Report metric values (loss, accuracy, ...)")
def report_metrics(device_id: str, body: MetricsIn, who: DeviceDep, store: StoreDep) -> dict[str, int]:
    if who.device.id != device_id:
        raise HTTPException(403, f"token is for device {who.device.id!r}, not {device_id!r}")
    return {"recorded": store.add_metrics(who.device.fleet, device_id, body.values, body.version)}


def _fleet_access(who, fleet: str) -> None:
    if not who.may_read_fleet(fleet):
        raise HTTPException(403, f"not a member of fleet {fleet!r}")


@router.get("/fleets/{fleet}/versions", summary="Published adapter versions of a fleet")
def list_versions(fleet: str, who: PrincipalDep, store: StoreDep, adapter: str | None = None) -> list[dict[str, Any]]:
    _fleet_access(who, fleet)
    return [version_json(v) for v in store.list_versions(fleet, adapter)]


def _resolve(store: Store, fleet: str, adapter: str, version: str) -> VersionRec:
    if version == "latest":
        v = store.latest_version(fleet, adapter)
    elif version.isascii() and version.isdigit() and len(version) <= 9:  # int() would take '²', '٣' or 10^5000
        v = store.get_version(fleet, adapter, int(version))
    else:
        raise HTTPException(422, "version must be a number or 'latest'")
    if v is None or v.sha256 is None:
        raise HTTPException(404, f"no published version {version} of {fleet}/{adapter}")
    return v


@router.get("/fleets/{fleet}/adapters/{adapter}/versions/{version}/info", summary="One version's facts and aggregation report")
def version_info(fleet: str, adapter: str, version: str, who: PrincipalDep, store: StoreDep) -> dict[str, Any]:
    _fleet_access(who, fleet)
    v = _resolve(store, fleet, adapter, version)
    out = version_json(v)
    if who.admin:
        out["deltas"] = [d.id for d in store.list_deltas(fleet, adapter, version=v.version)]
    return out


@router.get("/fleets/{fleet}/adapters/{adapter}/versions/{version}",
            summary="Download a version: its packed transport form (default), or the float32 safetensors delta with form=raw",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}})
def download_version(fleet: str, adapter: str, version: str, who: PrincipalDep, store: StoreDep,
                     range: Annotated[str | None, Header()] = None,
                     form: Literal["packed", "raw"] = "packed",
                     rank: Annotated[int | None, Query(ge=1, le=4096, description="a lower LoRA rank the fleet takes: the version refitted to it")] = None) -> Response:
    _fleet_access(who, fleet)
    v = _resolve(store, fleet, adapter, version)
    headers = {"X-Edgepeft-Version": str(v.version)}
    packed = v.report.get("packed")
    forms = v.report.get("ranks") or {}
    if rank is not None and str(rank) in forms:  # the version refitted to the device's rank at build time
        f = forms[str(rank)]
        sha, size = (f["raw_sha256"], f["raw_size"]) if form == "raw" else (f["sha256"], f["size"])
    elif rank is not None and rank != _own_rank(store, v):
        raise HTTPException(404, f"{fleet}/{adapter} v{v.version} has no rank-{rank} form; it is kept at rank "
                                 f"{_own_rank(store, v)} and {', '.join(sorted(forms)) or 'no other rank'}")
    elif form == "raw" or not packed:  # versions published before the packed form was kept are served raw
        sha, size = v.sha256, v.size
    else:
        sha, size = packed["sha256"], packed["size"]
    return serve_blob(store, sha, size, range, "application/octet-stream", {**headers, "X-Edgepeft-Sha256": sha})


def _own_rank(store: Store, v: VersionRec) -> int:
    """The LoRA rank a version is stored at (its fleet bundle's)."""
    f = store.get_fleet(v.fleet)
    rec = store.get_bundle(f.bundle) if f else None
    return bundle_rank(rec.manifest) if rec else 0


@router.get("/bundles/{fingerprint}", summary="A bundle's manifest and file list")
def bundle_info(fingerprint: str, who: PrincipalDep, store: StoreDep) -> dict[str, Any]:
    rec = _bundle_access(fingerprint, who, store)
    return {"fingerprint": rec.fingerprint, "manifest": rec.manifest_json,
            "files": [{"name": f.name, "sha256": f.sha256, "size": f.size} for f in rec.files]}


@router.get("/bundles/{fingerprint}/files/{name}", summary="Download one bundle file (HTTP range requests resume)",
            response_class=Response, responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a range"}})
def bundle_file(fingerprint: str, name: str, who: PrincipalDep, store: StoreDep,
                range: Annotated[str | None, Header()] = None) -> Response:
    rec = _bundle_access(fingerprint, who, store)
    for f in rec.files:  # the name is looked up, never used as a path
        if f.name == name:
            return serve_blob(store, f.sha256, f.size, range, "application/octet-stream")
    raise HTTPException(404, f"bundle has no file {name!r}")


def _bundle_access(fingerprint: str, who, store: Store):
    if not who.admin:
        fleet = store.get_fleet(who.device.fleet)
        if fleet is None or fleet.bundle != fingerprint:
            raise HTTPException(403, "not the bundle of your fleet")
    rec = store.get_bundle(fingerprint)
    if rec is None:
        raise HTTPException(404, f"no bundle {fingerprint[:16]}")
    return rec
