"""Hostile uploads: what each costs the hub, as a multiple of the delta the bundle expects.

    python benchmarks/bench_hostile.py [--layers 12] [--dim 768] [--rank 16] [--out benchmarks/results/hostile.json]

The hub runs in process (FastAPI TestClient, SQLite store) over a synthetic BERT-base-sized bundle
(LoRA on query and value of every layer, their biases, a 2-label head). Each hostile upload is sent
by a valid device token; the Python-heap peak (tracemalloc: numpy, zstd output and request buffers are
all counted) of the whole request is divided by the expected delta size (float32 at the bundle's
shapes). A baseline request (a 401) gives the fixed cost of any request. Also reported: status codes
(never 500), and the gzip tar bomb sent to the bundle endpoint.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import struct
import sys
import tarfile
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

try:
    from compression import zstd
except ImportError:
    from backports import zstd

from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hub import random_delta, synthetic_bundle  # noqa: E402
from common import write_result  # noqa: E402

from edgepeft.delta.format import delta_bytes, max_file_bytes, meta_to_strings, replace_meta
from edgepeft.delta.transport import MAGIC, PACKED_FORMAT, pack
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store

ADMIN = "bench-admin-token-0123456789abcdef"


def packed(meta: dict[str, str], specs: list, payload: bytes, header_extra: dict | None = None) -> bytes:
    """Packed-delta bytes with any header and payload (what a hostile device can send)."""
    hb = json.dumps({"format": PACKED_FORMAT, "meta": meta, "tensors": specs, **(header_extra or {})}).encode()
    return MAGIC + zstd.compress(struct.pack("<I", len(hb)) + hb + payload)


def zero_payload(specs: list) -> bytes:
    """Zero scales and values for ``specs``: compresses to almost nothing, decodes to the full size."""
    n = 0
    for _, shape in specs:
        rows = 1 if len(shape) == 1 else shape[0]
        n += rows * 4 + int(np.prod(shape))
    return bytes(n)


def hostile_uploads(manifest, device: str) -> dict[str, bytes]:
    """Name -> bytes of each hostile upload (and two honest ones for reference)."""
    good = replace_meta(random_delta(manifest, 1, device), creator=device)
    other = replace_meta(random_delta(manifest, 2, device), creator=device)
    meta = meta_to_strings(good.meta)
    specs = [[s.name, list(s.shape)] for s in sorted(manifest.slots, key=lambda s: s.name)]
    big_rank = [[n, [1024, shape[1]] if n.endswith("lora_A") else [shape[0], 1024] if n.endswith("lora_B") else shape]
                for n, shape in specs]
    raw = delta_bytes(other)
    hb = b'{"__metadata__": {' + b",".join(b'"k%d": "v"' % i for i in range(300_000)) + b"}}"
    nan_scale = bytearray(zero_payload(specs))
    nan_scale[:4] = struct.pack("<f", float("nan"))
    huge_samples = dict(meta, samples="9" * 18)
    return {
        "honest packed (accepted)": pack(good),
        "honest raw (accepted)": raw,
        "honest retry: the packed delta again, raw (same content: a duplicate, not stored)": delta_bytes(good),
        "packed: LoRA rank 1024 instead of the bundle's (zeros, ~tiny compressed)": packed(meta, big_rank, zero_payload(big_rank)),
        "packed: frame holds 256 MB more than the header describes": packed(meta, specs, zero_payload(specs) + bytes(256 * 2**20)),
        "packed: extra slot of 65536x4096": packed(meta, specs + [["evil.lora_A", [65536, 4096]]], b""),
        "packed: header of 4 MB": packed(meta, specs, zero_payload(specs), {"pad": "x" * (4 * 2**20)}),
        "packed: NaN row scale": packed(meta, specs, bytes(nan_scale)),
        "packed: truncated frame": pack(good)[:-40],
        "packed: samples 999999999999999999": packed(huge_samples, specs, zero_payload(specs)),
        "raw: 3 MB JSON header": struct.pack("<Q", len(hb)) + hb,
        "raw: body twice the largest valid delta": raw + bytes(len(raw)),
    }


def measure(client: TestClient, path: str, body: bytes, headers: dict) -> tuple[int, int]:
    """(status, Python-heap peak in bytes) of one request; the body is built before tracing starts."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    r = client.post(path, content=body, headers=headers)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return r.status_code, peak


def tar_bomb(member_bytes: int) -> bytes:
    """A gzip'd tar whose one member is ``member_bytes`` of zeros: a few KB per GB."""
    class Zeros(io.RawIOBase):
        def __init__(self, n: int) -> None:
            self.left = n

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            k = min(len(b), self.left)
            b[:k] = bytes(k)
            self.left -= k
            return k

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("weights.bin")
        info.size = member_bytes
        tar.addfile(info, io.BufferedReader(Zeros(member_bytes), 1 << 20))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--bomb-mb", type=int, default=1024, help="uncompressed size of the gzip tar bomb")
    ap.add_argument("--out", default="hostile")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        manifest = synthetic_bundle(bundle, a.layers, a.dim, a.rank, 2)
        store = open_store(str(Path(tmp) / "store"))
        app = create_app(store, admin_token=ADMIN, max_upload_bytes=64 * 2**20, max_bundle_bytes=64 * 2**20,
                         policy_interval_s=0)
        expected = 4 * manifest.trainable_numbers
        rows = []
        with TestClient(app) as client:
            admin = {"Authorization": f"Bearer {ADMIN}"}
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                for p in sorted(bundle.iterdir()):
                    tar.add(p, arcname=p.name)
            fp = client.post("/api/v1/bundles", content=buf.getvalue(), headers=admin).json()["fingerprint"]
            client.post("/api/v1/fleets", json={"name": "f", "bundle": fp}, headers=admin)
            token = client.post("/api/v1/fleets/f/devices", json={"device": "d"}, headers=admin).json()["token"]
            dev = {"Authorization": f"Bearer {token}"}
            for _ in range(2):  # the second one, warm, is the fixed cost of any request
                status, base = measure(client, "/api/v1/devices/d/deltas", b"x", {"Authorization": "Bearer d.wrong"})
            print(f"expected delta size {expected / 2**20:.2f} MiB; baseline request (401): {base / 2**10:.0f} KiB")
            for name, body in hostile_uploads(manifest, "d").items():
                status, peak = measure(client, "/api/v1/devices/d/deltas", body, dev)
                rows.append({"case": name, "body_bytes": len(body), "status": status, "peak_bytes": peak,
                             "peak_x_expected": round(peak / expected, 3)})
                print(f"{status}  peak {peak / 2**20:7.2f} MiB = {peak / expected:5.2f}x  body {len(body):>10}  {name}")
            stored = len(store.list_deltas("f"))
            bomb = tar_bomb(a.bomb_mb * 2**20)
            status, peak = measure(client, "/api/v1/bundles", bomb, admin)
            print(f"{status}  peak {peak / 2**20:7.2f} MiB  gzip tar bomb: {len(bomb)} bytes -> {a.bomb_mb} MiB (cap 64 MiB)")
        store.close()
    hostile = [r for r in rows if "honest" not in r["case"]]
    write_result(a.out, {
        "bundle": {"layers": a.layers, "dim": a.dim, "rank": a.rank, "expected_delta_bytes": expected,
                   "max_file_bytes": max_file_bytes(manifest)},
        "baseline_request_peak_bytes": base,
        "uploads": rows,
        "worst_hostile_peak_x_expected": max(r["peak_x_expected"] for r in hostile),
        "statuses_500": sum(r["status"] >= 500 for r in rows),
        "deltas_stored": stored,
        "tar_bomb": {"compressed_bytes": len(bomb), "uncompressed_bytes": a.bomb_mb * 2**20, "status": status,
                     "peak_bytes": peak, "cap_bytes": 64 * 2**20},
    })


if __name__ == "__main__":
    main()
