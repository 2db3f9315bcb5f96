"""The one place where edgepeft's typed errors become HTTP statuses (the app's exception handlers use it)."""

from __future__ import annotations

from edgepeft.errors import AuthError, ConflictError, DeltaError, EdgePeftError, NotFoundError, UnavailableError

STATUS: tuple[tuple[type[EdgePeftError], int], ...] = (
    (AuthError, 401),
    (NotFoundError, 404),
    (ConflictError, 409),
    (UnavailableError, 503),  # the store lost a row the request needs: the admin's to fix, the device retries later
    (DeltaError, 422),  # a delta that is corrupt, hostile, or does not fit the bundle
)
DEFAULT_STATUS = 422  # any other refusal: the request asked for something invalid


def http_status(exc: EdgePeftError) -> int:
    """The HTTP status a request that raised ``exc`` is answered with."""
    return next((status for kind, status in STATUS if isinstance(exc, kind)), DEFAULT_STATUS)
