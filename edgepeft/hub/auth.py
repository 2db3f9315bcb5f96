"""Who is calling: the admin or a device, from ``Authorization: Bearer <token>`` (never from the URL).

Device tokens are ``<device id>.<secret>``; the store keeps only their sha256 and compares in constant
time, on every request, so a revoked or rotated token fails from the next request on. A missing or
wrong token is 401; a valid token asking for what it may not have is 403. The status page also takes
a session cookie set by its login form (``status_session``); it opens that page and nothing else.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from edgepeft.hub.store import Device, Store, hash_token

bearer = HTTPBearer(auto_error=False, description="The admin token, or a device token `<device>.<secret>`.")


async def get_store(request: Request) -> Store:
    """The store the app was created with (tests swap it through ``app.dependency_overrides``). Async: FastAPI runs a
    plain ``def`` dependency in the thread pool, and this one only reads an attribute."""
    return request.app.state.store


StoreDep = Annotated[Store, Depends(get_store)]


@dataclass(frozen=True)
class Principal:
    """The caller: the admin (device None) or one device."""

    admin: bool
    device: Device | None = None

    def may_read_fleet(self, fleet: str) -> bool:
        return self.admin or (self.device is not None and self.device.fleet == fleet)


def unauthorized(why: str) -> HTTPException:
    return HTTPException(401, why, headers={"WWW-Authenticate": "Bearer"})


def principal(request: Request, store: StoreDep,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Principal:
    """Authenticate the caller; 401 without a valid token."""
    token = creds.credentials if creds is not None else None  # never from the URL: access logs keep URLs
    if not token:
        raise unauthorized("missing bearer token")
    if hmac.compare_digest(hash_token(token), request.app.state.admin_hash):
        return Principal(admin=True)
    device = store.authenticate(token)
    if device is None:
        raise unauthorized("invalid token")
    store.seen(device.id)
    return Principal(admin=False, device=device)


PrincipalDep = Annotated[Principal, Depends(principal)]

SESSION_COOKIE = "edgepeft_status"
SESSION_MAX_AGE_S = 12 * 3600


def status_session(admin_token: str) -> str:
    """The status page's cookie value: derived from the admin token, useless as a token anywhere else."""
    return hmac.new(admin_token.encode("utf-8"), b"edgepeft status page session", hashlib.sha256).hexdigest()


def may_see_status(request: Request, creds: HTTPAuthorizationCredentials | None) -> bool:
    """True for the admin token as bearer, or a valid status session cookie."""
    if creds is not None:
        return hmac.compare_digest(hash_token(creds.credentials), request.app.state.admin_hash)
    cookie = request.cookies.get(SESSION_COOKIE, "")
    return hmac.compare_digest(hash_token(cookie), request.app.state.session_hash)


def admin(who: PrincipalDep) -> Principal:
    """The admin, or 403."""
    if not who.admin:
        raise HTTPException(403, "this needs the admin token")
    return who


def device(who: PrincipalDep) -> Principal:
    """A device, or 403 (the admin token does not act as a device)."""
    if who.device is None:
        raise HTTPException(403, "this needs a device token")
    return who


AdminDep = Annotated[Principal, Depends(admin)]
DeviceDep = Annotated[Principal, Depends(device)]
