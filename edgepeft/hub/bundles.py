"""Bundles on the hub: unpack (streamed, capped) and check an uploaded tar, serve stored blobs with HTTP range requests."""

from __future__ import annotations

import gzip
import hashlib
import io
import re
import tarfile
import zlib
from typing import IO, Iterator

from fastapi import HTTPException
from fastapi.responses import Response, StreamingResponse

from edgepeft.errors import BundleError, HubError
from edgepeft.manifest import Manifest, files_of
from edgepeft.names import MANIFEST_FILE, is_safe_name
from edgepeft.onnx_refs import check_reads_only
from edgepeft.hub.store import Store

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=([0-9]{0,18})-([0-9]{0,18})$", re.ASCII)


MAX_MEMBERS = 64  # a bundle is a handful of files


class _Capped(io.RawIOBase):
    """A read-only stream that refuses to deliver more than ``limit`` bytes: caps what a tar expands to."""

    def __init__(self, inner: IO[bytes], limit: int) -> None:
        self.inner, self.left, self.limit = inner, limit, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.inner.read(min(len(b), self.left + 1))
        if len(data) > self.left:
            raise HubError(f"bundle upload expands past the {self.limit}-byte limit; refused")
        self.left -= len(data)
        b[:len(data)] = data
        return len(data)


def files_from_tar(body: IO[bytes], limit: int) -> dict[str, bytes]:
    """name -> bytes of every regular file in a tar (or tar.gz), streamed: names flat and safe, links refused,
    at most ``MAX_MEMBERS`` members and ``limit`` bytes once decompressed (tar headers included)."""
    head = body.read(2)
    body.seek(0)
    raw: IO[bytes] = gzip.GzipFile(fileobj=body, mode="rb") if head == b"\x1f\x8b" else body
    stream = io.BufferedReader(_Capped(raw, limit), 1 << 16)
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for i, member in enumerate(tar):
                if i >= MAX_MEMBERS:
                    raise HubError(f"bundle tar: more than {MAX_MEMBERS} members; a bundle is a handful of files")
                name = member.name[2:] if member.name.startswith("./") else member.name
                if member.isdir() and name in ("", "."):
                    continue
                if not member.isfile():
                    raise HubError(f"bundle tar: {member.name[:80]!r} is not a regular file (links and folders are refused)")
                if not is_safe_name(name) or name in files:
                    raise HubError(f"bundle tar: member name {member.name[:80]!r} is unsafe or repeated; the tar must be flat")
                if member.size > limit - sum(len(v) for v in files.values()):
                    raise HubError(f"bundle tar: {name!r} declares {member.size} bytes; the bundle limit is {limit}")
                f = tar.extractfile(member)
                files[name] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise HubError(f"bundle upload is not a readable tar or tar.gz ({str(e)[:120]})") from None
    return files


def check_bundle_files(files: dict[str, bytes]) -> str:
    """The manifest JSON, after checking that the files form a complete, untampered bundle: the weights match
    the fingerprint and both graphs read those weights and no other file."""
    if MANIFEST_FILE not in files:
        raise HubError(f"bundle upload lacks {MANIFEST_FILE}")
    try:
        manifest = Manifest.from_json(files[MANIFEST_FILE], where=f"uploaded {MANIFEST_FILE}")
        missing = sorted(set(files_of(manifest)) - set(files))
        if missing:
            raise HubError(f"bundle upload lacks {', '.join(missing)}")
        if hashlib.sha256(files[manifest.weights]).hexdigest() != manifest.fingerprint:
            raise HubError(f"bundle upload: {manifest.weights} does not match the manifest fingerprint; the bundle is corrupt")
        for graph in manifest.graphs.values():
            check_reads_only(files[graph.file], manifest.weights, f"bundle upload: {graph.file}")
    except BundleError as e:
        raise HubError(str(e)) from None
    return files[MANIFEST_FILE].decode("utf-8")


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
