"""Request bodies: read with a byte limit (413 past it), into memory for deltas or spooled to disk for bundles.

A client that hangs up mid-body is one log line and a 400 nobody reads, never a traceback.
"""

from __future__ import annotations

import logging
import tempfile
from typing import IO, AsyncIterator

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

log = logging.getLogger("edgepeft.hub")

SPOOL_IN_MEMORY = 8 * 2**20  # a bundle body larger than this goes to a temporary file


async def _chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {declared} bytes is over the {limit}-byte limit")
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"body is over the {limit}-byte limit")
            yield chunk
    except ClientDisconnect:
        log.warning("%s %s: client hung up after %d body bytes", request.method, request.url.path, total)
        raise HTTPException(400, "client disconnected mid-upload") from None


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body in memory (not copied again), or 413 as soon as it passes ``limit`` bytes."""
    buf = bytearray()
    async for chunk in _chunks(request, limit):
        buf += chunk
    return buf


async def spool_body(request: Request, limit: int) -> IO[bytes]:
    """The request body in a temporary file (memory below ``SPOOL_IN_MEMORY``), rewound; the caller closes it."""
    f = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    try:
        async for chunk in _chunks(request, limit):
            f.write(chunk)
    except BaseException:
        f.close()
        raise
    f.seek(0)
    return f
