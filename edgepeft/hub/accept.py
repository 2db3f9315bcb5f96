"""One upload, from bytes to an answer: who sends it (from per-process caches where possible), every check, and the
one write that stores it. The route in api_device.py makes one thread hop for the checks and awaits the commit on
the event loop, so a handler thread never waits through an fsync.

On the hot path the store is asked one thing (the latest version of the adapter) and written once (the accept);
whether a delta is a retry is asked only when the accept or the parent check says no (a retry is checked again).
"""

from __future__ import annotations

import hmac
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException, Request

from edgepeft.delta.format import DeltaMeta
from edgepeft.delta.transport import is_packed
from edgepeft.errors import DeltaError, HubError, UnavailableError
from edgepeft.hub import aggregate as agg
from edgepeft.hub import limits
from edgepeft.hub.auth import unauthorized
from edgepeft.hub.packed_check import check_packed
from edgepeft.hub.store import DeltaRec, Device, Fleet, Store, check_name, hash_token, sha256_hex
from edgepeft.manifest import Manifest

Answer = tuple[int, dict[str, Any]]  # (HTTP status, JSON body)


def manifest_of(request: Request, store: Store, fingerprint: str) -> Manifest:
    """The bundle manifest, cached per process (bundles never change)."""
    cache = request.app.state.manifests
    if fingerprint not in cache:
        rec = store.get_bundle(fingerprint)
        if rec is None:
            raise UnavailableError(f"bundle {fingerprint[:16]} of the fleet is missing from the hub's store; the admin "
                                   "adds it again: edgepeft hub bundle add BUNDLE_DIR")
        cache[fingerprint] = rec.manifest
    return cache[fingerprint]


@dataclass(frozen=True)
class Uploader:
    """An authenticated device about to upload: who, the token hash it showed, its fleet and that fleet's bundle."""

    device: Device
    token_hash: str
    fleet: Fleet
    manifest: Manifest


def uploader(request: Request, store: Store, token: str | None, device_id: str, *, memory_only: bool = False) -> Uploader | None:
    """Authenticate an upload's token and look up its fleet and manifest (401 / 403 as ``auth.principal`` answers).
    ``memory_only``: answer from the per-process caches or return None, never touching the store (on the event loop)."""
    if not token:
        raise unauthorized("missing bearer token")
    token_hash = hash_token(token)
    if hmac.compare_digest(token_hash, request.app.state.admin_hash):
        raise HTTPException(403, "this needs a device token")
    if memory_only:
        device = store.auth_cache.get(token_hash)
        fleet = store.cached_fleet(device.fleet) if device is not None else None
        if fleet is None or fleet.bundle not in request.app.state.manifests:
            return None
    else:
        device = store.authenticate(token)
        if device is None:
            raise unauthorized("invalid token")
        fleet = store.fleet(device.fleet)
        if fleet is None:
            raise UnavailableError(f"fleet {device.fleet!r} of device {device.id!r} is missing from the hub's store; the "
                                   f"admin creates it again: edgepeft hub fleet create {device.fleet} --bundle FINGERPRINT")
    if device.id != device_id:
        raise HTTPException(403, f"token is for device {device.id!r}, not {device_id!r}")
    return Uploader(device, token_hash, fleet, manifest_of(request, store, fleet.bundle))


@dataclass(frozen=True)
class Pending:
    """A delta that passed every check and is being committed: ``added`` is set once that is durable."""

    store: Store
    device: Device
    rec: DeltaRec
    content: str
    added: Future

    def stored(self) -> Answer:
        """The answer once ``added`` says the delta was stored (no I/O: fine on the event loop)."""
        return 201, {"id": self.rec.id, "duplicate": False, "adapter": self.rec.adapter, "parent": self.rec.parent}

    def not_stored(self) -> Answer:
        """The answer once ``added`` says it was not: the same bytes or content were stored before (a retry)."""
        return (_stored_already(self.store, self.device, self.rec.id, self.content)
                or _refuse(409, "the delta was stored and dropped meanwhile; send it again"))


def accept_delta(store: Store, device: Device, data: bytes, manifest: Manifest, token_hash: str | None = None) -> Answer:
    """Validate, then store: (status, body), waiting for the commit. See :func:`start`."""
    answer = start(store, device, data, manifest, token_hash)
    if isinstance(answer, Pending):
        return answer.stored() if answer.added.result() else answer.not_stored()
    return answer


def start(store: Store, device: Device, data: bytes, manifest: Manifest, token_hash: str | None = None) -> Answer | Pending:
    """Validate an upload and hand it to the store: an answer now (a refusal, or 200 for a retry whose parent went
    stale), or the Pending commit. Nothing is stored unless every check passed; a delta already stored (the same
    bytes, or the same content in other bytes) is answered 200 and stored once. ``token_hash``: the token the upload
    authenticated with; the store refuses the delta (401) if it was revoked or rotated before the commit."""
    store.seen(device.id)
    sha = sha256_hex(data)
    fleet = store.fleet(device.fleet)
    ranks = fleet.ranks if fleet else ()
    try:
        checked = _checked_upload(data, f"upload from {device.id}", manifest, device.id)
    except DeltaError as e:  # a delta of another method or config fails the shape checks: say that instead (409)
        why = agg.disagreement(agg.peek_meta(data, manifest), manifest, ranks)
        raise HTTPException(409 if why else 422, why or str(e)) from None
    meta, largest, content = checked
    why = agg.disagreement(meta, manifest, ranks)
    if why:
        raise HTTPException(409, why)
    if meta.creator and meta.creator != device.id:
        raise HTTPException(403, f"delta says it was made by {meta.creator!r}; a device uploads only as itself")
    if largest > limits.MAX_ABS_VALUE:
        raise HTTPException(422, f"delta holds a value of magnitude {largest:.3g}; the hub accepts at most "
                                 f"{limits.MAX_ABS_VALUE:g} (LoRA and bias deltas are small)")
    if not 1 <= meta.samples <= limits.MAX_SAMPLES_CLAIM:
        raise HTTPException(422, f"delta has samples={meta.samples}; the hub accepts 1..{limits.MAX_SAMPLES_CLAIM}")
    try:
        check_name("adapter", meta.adapter)
    except HubError as e:
        raise HTTPException(422, str(e)) from None
    latest = store.latest_version(device.fleet, meta.adapter)
    why = agg.check_parent(latest.version if latest else 0, meta.parent, fleet.staleness if fleet else 0)
    if why:  # a retry of a delta accepted before its parent went stale is still answered as the duplicate it is
        return _stored_already(store, device, sha, content) or _refuse(409, why)
    rec = DeltaRec(sha, device.fleet, device.id, meta.adapter, meta.parent or 0, meta.samples, len(data), time.time())
    return Pending(store, device, rec, content, store.add_delta_soon(rec, data, content, token_hash=token_hash))


def _checked_upload(data: bytes, where: str, manifest: Manifest, device: str) -> tuple[DeltaMeta, float, str]:
    """(meta, largest |value|, content id) of an upload that passed every check the device reader makes: a packed one
    from its int8 codes (hub/packed_check.py), a raw one read as the device reads it. DeltaError otherwise."""
    if is_packed(data):
        c = check_packed(data, where, manifest)
        return c.meta, c.largest, limits.codes_content_id(c.meta, c.shapes, c.codes, device)
    delta = agg.parse_delta(data, where, manifest)
    return delta.meta, limits.largest_value(delta), limits.content_id(delta, device)


def _stored_already(store: Store, device: Device, sha: str, content: str) -> Answer | None:
    """(200, its answer) if these bytes or this content are stored; 403 if another device uploaded these bytes."""
    same = store.get_delta(sha) or store.find_content(content)
    if same is None:
        return None
    if same.device != device.id:
        raise HTTPException(403, "these bytes were uploaded by another device")
    return 200, {"id": same.id, "duplicate": True, "adapter": same.adapter, "parent": same.parent}


def _refuse(status: int, why: str) -> Answer:
    raise HTTPException(status, why)
