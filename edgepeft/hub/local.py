"""A hub on this machine: a free loopback port, `edgepeft hub serve` as a child process, a bundle as the tar the
hub's upload takes. What the demo, the benchmarks and `edgepeft hub bundle add` share."""

from __future__ import annotations

import ctypes
import io
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

from edgepeft.errors import HubError


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In a hub's child process (Linux): SIGTERM it when the process that started it dies, however that dies."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_hub(store: Path | str, port: int, log: Path, *options: str, wait_s: float = 60.0) -> subprocess.Popen:
    """`edgepeft hub serve` on 127.0.0.1:``port`` over ``store`` (a folder or a store URI) with more ``options``, its
    output appended to ``log``; returns once /healthz answers (the caller stops the process).

    On Linux the hub also stops when its starter is killed (a demo or benchmark stopped with SIGTERM or SIGKILL runs
    no ``finally``, and its hub kept the port and the store); call this from the thread that outlives the hub, since
    the kernel signals when the starting thread exits."""
    cmd = [sys.executable, "-m", "edgepeft.cli", "hub", "serve", "--store", str(store), "--port", str(port),
           "--log-level", "warning", *options]
    with open(log, "ab") as out:  # the child holds its own copy of the descriptor
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent if sys.platform == "linux" else None)
    url, deadline = f"http://127.0.0.1:{port}/healthz", time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HubError(f"the hub exited with status {proc.returncode}; see {log}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise HubError(f"the hub did not answer on {url} within {wait_s:.0f} s; see {log}")


def bundle_tar(bundle_dir: Path) -> bytes:
    """The bundle's files (hidden ones left out) as an uncompressed tar, sorted: what POST /api/v1/bundles takes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(Path(bundle_dir).iterdir()):
            if p.is_file() and not p.name.startswith("."):
                tar.add(p, arcname=p.name)
    return buf.getvalue()
