"""Bundles on the hub: unpack and check an uploaded tar, serve stored blobs with HTTP range requests."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
from typing import Iterator

from fastapi import HTTPException
from fastapi.responses import Response, StreamingResponse

from edgepeft.errors import BundleError, HubError
from edgepeft.manifest import Manifest
from edgepeft.names import MANIFEST_FILE, is_safe_name
from edgepeft.hub.store import Store

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def files_from_tar(data: bytes) -> dict[str, bytes]:
    """name -> bytes of every regular file in a (possibly compressed) tar; names must be flat and safe."""
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir() and name in ("", "."):
                    continue
                if not member.isfile():
                    raise HubError(f"bundle tar: {member.name!r} is not a regular file (links and folders are refused)")
                if not is_safe_name(name) or name in files:
                    raise HubError(f"bundle tar: member name {member.name!r} is unsafe or repeated; the tar must be flat")
                f = tar.extractfile(member)
                files[name] = f.read() if f is not None else b""
    except tarfile.TarError as e:
        raise HubError(f"bundle upload is not a readable tar ({e})") from None
    return files


def check_bundle_files(files: dict[str, bytes]) -> str:
    """The manifest JSON, after checking that the files form a complete, untampered bundle."""
    if MANIFEST_FILE not in files:
        raise HubError(f"bundle upload lacks {MANIFEST_FILE}")
    try:
        text = files[MANIFEST_FILE].decode("utf-8")
        manifest = Manifest.from_json(text, where=f"uploaded {MANIFEST_FILE}")
    except (UnicodeDecodeError, BundleError) as e:
        raise HubError(str(e) if isinstance(e, BundleError) else f"{MANIFEST_FILE} is not UTF-8") from None
    needed = [g.file for g in manifest.graphs.values()] + [manifest.weights] + ([manifest.tokenizer] if manifest.tokenizer else [])
    missing = sorted(set(needed) - set(files))
    if missing:
        raise HubError(f"bundle upload lacks {', '.join(missing)}")
    if hashlib.sha256(files[manifest.weights]).hexdigest() != manifest.fingerprint:
        raise HubError(f"bundle upload: {manifest.weights} does not match the manifest fingerprint; the bundle is corrupt")
    return text


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) of a single ``bytes=`` range, None for no header; HTTPException 416 if unsatisfiable."""
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None  # unsupported forms (multiple ranges): serve the whole file, as RFC 9110 allows
    first, last = m.group(1), m.group(2)
    if first == "":
        start, end = max(0, size - int(last)), size
    else:
        start = int(first)
        end = size if last == "" else min(size, int(last) + 1)
    if start >= size or start >= end:
        raise HTTPException(416, f"range {header} is outside 0..{size}", headers={"Content-Range": f"bytes */{size}"})
    return start, end


def serve_blob(store: Store, sha: str, size: int, range_header: str | None, media_type: str,
               extra: dict[str, str] | None = None) -> Response:
    """A blob as a response: 206 for a range, else streamed whole in chunks."""
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha}"', **(extra or {})}
    rng = parse_range(range_header, size)
    if rng is not None:
        start, end = rng
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return Response(store.read_blob(sha, start, end - start), status_code=206, media_type=media_type, headers=headers)

    def chunks() -> Iterator[bytes]:
        for pos in range(0, size, CHUNK):
            yield store.read_blob(sha, pos, min(CHUNK, size - pos))

    headers["Content-Length"] = str(size)
    return StreamingResponse(chunks(), media_type=media_type, headers=headers)
