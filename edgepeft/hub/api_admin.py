"""Admin endpoints (admin token): register bundles, create fleets and device tokens, publish and aggregate."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from edgepeft.errors import NotFoundError
from edgepeft.hub import aggregate as agg
from edgepeft.hub import limits
from edgepeft.hub.api_device import BINARY_BODY, version_json
from edgepeft.hub.auth import AdminDep, StoreDep
from edgepeft.hub.bodies import read_body, spool_body
from edgepeft.hub.bundles import check_bundle_files, files_from_tar
from edgepeft.hub.store import NAME_RE, Fleet, check_name

router = APIRouter(prefix="/api/v1")


class FleetIn(BaseModel):
    """A new fleet and its aggregation policy."""

    name: str = Field(max_length=64, description="fleet name: 1-64 letters, digits, _ or -")
    bundle: str = Field(max_length=64, description="fingerprint of a registered bundle")
    aggregate_every: int = Field(0, ge=0, le=10**6, description="aggregate when this many deltas are pending (0: not by count)")
    aggregate_minutes: float = Field(0.0, ge=0, le=10**7, allow_inf_nan=False,
                                     description="aggregate when the oldest pending delta is this old (0: not by time)")
    staleness: int = Field(2, ge=0, le=10**6, description="refuse deltas trained from a version more than this many behind")
    robust: dict[str, Any] = Field(default_factory=dict, max_length=8,
                                   description="default aggregation options (clip_norm, clip_median, trim, buckets, max_samples, server_lr, server_momentum, memory_mb)")
    ranks: list[int] = Field(default_factory=list, max_length=16,
                             description="LoRA ranks devices may train at, each at most the bundle's (empty: the bundle's only)")


class DeviceIn(BaseModel):
    """A new device of a fleet."""

    device: str = Field(max_length=64, description="device id: 1-64 letters, digits, _ or -")


class AggregateIn(BaseModel):
    """Options of one aggregation; omitted: the fleet's defaults."""

    clip_norm: float | None = Field(None, gt=0, allow_inf_nan=False, description="clip each device's update (ΔW space) to this norm")
    trim: float | None = Field(None, ge=0, lt=0.5, description="coordinate-wise trimmed mean, fraction cut at each end")
    max_samples: int | None = Field(None, ge=1, le=limits.MAX_SAMPLES_CLAIM,
                                    description=f"cap on one delta's weight (default {limits.DEFAULT_MAX_SAMPLES})")


def _fleet_json(f: Fleet) -> dict[str, Any]:
    return {"name": f.name, "bundle": f.bundle, "aggregate_every": f.aggregate_every, "aggregate_minutes": f.aggregate_minutes,
            "staleness": f.staleness, "robust": f.robust, "ranks": list(f.ranks), "created": f.created}


@router.post("/bundles", status_code=201, openapi_extra=BINARY_BODY,
             summary="Register a bundle: a tar (optionally gzip) of its files, flat")
async def add_bundle(request: Request, who: AdminDep, store: StoreDep) -> dict[str, Any]:
    limit = request.app.state.max_bundle_bytes
    body = await spool_body(request, limit)

    def work() -> dict[str, Any]:
        with body:
            files = files_from_tar(body, limit)  # streamed; members capped by the same limit, unpacked
        text = check_bundle_files(files)
        rec, added = store.add_bundle(text, files)
        return {"fingerprint": rec.fingerprint, "added": added, "files": [{"name": f.name, "size": f.size} for f in rec.files]}

    return await run_in_threadpool(work)  # a HubError is answered by the app's one mapping (http_errors)


@router.get("/bundles", summary="Registered bundles")
def list_bundles(who: AdminDep, store: StoreDep) -> list[dict[str, Any]]:
    return [{"fingerprint": b.fingerprint, "created": b.created, "files": [f.name for f in b.files]} for b in store.list_bundles()]


@router.post("/fleets", status_code=201, summary="Create a fleet")
def create_fleet(body: FleetIn, who: AdminDep, store: StoreDep) -> dict[str, Any]:
    from edgepeft.hub.robust import RobustOptions

    RobustOptions.from_dict(body.robust)  # errors: typed, answered by the app's one mapping (http_errors)
    f = store.create_fleet(body.name, body.bundle, aggregate_every=body.aggregate_every,
                           aggregate_minutes=body.aggregate_minutes, staleness=body.staleness, robust=body.robust,
                           ranks=body.ranks)
    return _fleet_json(f)


@router.get("/fleets", summary="Every fleet")
def list_fleets(who: AdminDep, store: StoreDep) -> list[dict[str, Any]]:
    return [_fleet_json(f) for f in store.list_fleets()]


@router.post("/fleets/{fleet}/devices", status_code=201, summary="Add a device; its token is in the answer, once")
def add_device(fleet: str, body: DeviceIn, who: AdminDep, store: StoreDep) -> dict[str, str]:
    token = store.add_device(fleet, body.device)  # no fleet: 404, taken: 409 (http_errors)
    return {"device": body.device, "fleet": fleet, "token": token}


@router.get("/fleets/{fleet}/devices", summary="Devices of a fleet, when each was last seen, and whether it is revoked")
def list_devices(fleet: str, who: AdminDep, store: StoreDep) -> list[dict[str, Any]]:
    return [{"device": d.id, "created": d.created, "last_seen": d.last_seen, "revoked": d.revoked}
            for d in store.list_devices(fleet)]


def _member(store, fleet: str, device: str) -> None:
    d = store.get_device(device) if NAME_RE.match(device) else None
    if d is None or d.fleet != fleet:
        raise HTTPException(404, f"no device {device!r} in fleet {fleet!r}")


@router.post("/fleets/{fleet}/devices/{device}/token", status_code=201,
             summary="Rotate a device's token: the new one is in the answer, once; the old one is refused from now on")
def rotate_token(fleet: str, device: str, who: AdminDep, store: StoreDep) -> dict[str, str]:
    _member(store, fleet, device)
    return {"device": device, "fleet": fleet, "token": store.rotate_token(device)}


@router.delete("/fleets/{fleet}/devices/{device}/token", summary="Revoke a device's token (401 from the next request on)")
def revoke_token(fleet: str, device: str, who: AdminDep, store: StoreDep) -> dict[str, Any]:
    _member(store, fleet, device)
    store.revoke_device(device)
    return {"device": device, "fleet": fleet, "revoked": True}


@router.get("/fleets/{fleet}/deltas", summary="Accepted deltas of a fleet and the version each went into")
def list_deltas(fleet: str, who: AdminDep, store: StoreDep, pending: bool = False) -> list[dict[str, Any]]:
    return [{"id": d.id, "device": d.device, "adapter": d.adapter, "parent": d.parent, "samples": d.samples,
             "size": d.size, "received": d.received, "version": d.version} for d in store.list_deltas(fleet, pending=pending)]


@router.post("/fleets/{fleet}/adapters/{adapter}/versions", status_code=201, openapi_extra=BINARY_BODY,
             summary="Publish a delta as the next version (no aggregation)")
async def publish(fleet: str, adapter: str, request: Request, who: AdminDep, store: StoreDep) -> dict[str, Any]:
    data = await read_body(request, request.app.state.max_upload_bytes)
    _check_fleet(store, fleet, adapter)
    return version_json(await run_in_threadpool(agg.publish, store, fleet, adapter, data))


@router.post("/fleets/{fleet}/adapters/{adapter}/aggregate", status_code=201,
             summary="Aggregate every pending delta into a new version", responses={409: {"description": "nothing pending"}})
def aggregate(fleet: str, adapter: str, who: AdminDep, store: StoreDep, request: Request,
              body: AggregateIn | None = None) -> dict[str, Any]:
    _check_fleet(store, fleet, adapter)
    f = store.get_fleet(fleet)
    options = dict(f.robust)
    if body is not None:
        options.update({k: v for k, v in body.model_dump().items() if v is not None})
    with request.app.state.aggregate_lock:
        v = agg.aggregate(store, fleet, adapter, options)
    if v is None:
        raise HTTPException(409, f"no pending deltas for {fleet}/{adapter}")
    return version_json(v)


def _check_fleet(store, fleet: str, adapter: str) -> None:
    if store.get_fleet(fleet) is None:
        raise NotFoundError(f"no fleet {fleet!r}")
    check_name("adapter", adapter)
