"""Where a hub upload's CPU goes: the hub's threads under bench_hub's load, the checks one by one, SQLite's write.

    python benchmarks/hub_profile.py [--uploads 20]

1. One hub on SQLite under bench_hub's upload load (64 devices, 4 client processes): CPU ms per upload of the event
   loop thread (HTTP, routing, the answer) and of the other threads together (checks and hashing in the upload
   threads, the INSERTs and commits in the committer), from /proc/PID/task.
2. The checks of one MiniLM-size packed delta, each alone in this process: packed_check.check_packed, the content id,
   sha256 of the bytes, the zstd decompression within the check.
3. SQLite (WAL, synchronous=FULL, batches of 32 as group commit makes them): CPU ms per delta to commit 94 KB blobs
   at 4 KiB pages (SQLite's default, stores made before) and 32 KiB (hub/sqlite_store.PAGE_SIZE); and the upload's
   three INSERTs (delta row, blob, content id) against one row holding all three.
Writes results/hub_profile.json.

The same for the code at 31bc7d1 (this file and bench_hub's upload part, over that export's edgepeft):
    git archive 31bc7d1 | tar -x -C /tmp/s5 && cd /tmp/s5 && PYTHONPATH=$PWD python OUR/benchmarks/hub_profile.py --name hub_profile_s5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).parent))
import bench_hub  # noqa: E402
from common import write_result  # noqa: E402
from edgepeft.delta import transport  # noqa: E402
from edgepeft.hub import limits  # noqa: E402
from edgepeft.hub.packed_check import check_packed  # noqa: E402


def _thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread of ``pid``: 'event loop' (the main thread) and 'other threads' together."""
    out = {"event loop": 0.0, "other threads": 0.0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out["event loop" if task.name == str(pid) else "other threads"] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def hub_threads(uploads: int) -> dict:
    """bench_hub's one-hub SQLite run, with the hub's CPU split by thread."""
    run_clients = bench_hub._run_clients

    def measured(urls, tokens, per_device, bundle, procs, pids, *rest):
        before = _thread_cpu(pids[0])
        row = run_clients(urls, tokens, per_device, bundle, procs, pids, *rest)
        after = _thread_cpu(pids[0])
        row["hub_cpu_ms_per_upload_by_thread"] = {k: round((after[k] - before[k]) / row["uploads"] * 1000, 3) for k in after}
        return row

    bench_hub._run_clients = measured
    try:
        with tempfile.TemporaryDirectory(prefix="hub-profile-") as tmp:
            return bench_hub.bench_uploads(None, 64, uploads, Path(tmp), 4)
    finally:
        bench_hub._run_clients = run_clients


def _cpu_ms(fn: Callable[[], object], n: int = 500) -> float:
    """CPU ms of one call, the least of five rounds of ``n`` (the rounds a busy machine slowed least)."""
    fn()
    best = float("inf")
    for _ in range(5):
        t = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t) / n)
    return round(best * 1000, 4)


def checks() -> dict:
    with tempfile.TemporaryDirectory(prefix="hub-profile-") as tmp:
        manifest = bench_hub.synthetic_bundle(Path(tmp), layers=6, dim=384, rank=8, labels=2)
    data = bench_hub.pack(bench_hub.random_delta(manifest, 1, "d001"))
    c = check_packed(data, "x", manifest)
    frame = memoryview(data)[len(transport.MAGIC):]
    return {"packed_delta_bytes": len(data),
            "check_packed_ms": _cpu_ms(lambda: check_packed(data, "x", manifest)),
            "zstd_decompress_ms": _cpu_ms(lambda: transport.zstd.decompress(frame)),
            "content_id_ms": _cpu_ms(lambda: limits.codes_content_id(c.meta, c.shapes, c.codes, "d001")),
            "sha256_ms": _cpu_ms(lambda: hashlib.sha256(data).hexdigest())}


def _sqlite_commit_ms(page_size: int, one_row: bool, deltas: int = 1280, batch: int = 32) -> float:
    """CPU ms per delta to commit ``deltas`` 94 KB blobs in batches, as the hub's committer writes them."""
    blob = os.urandom(94_000)
    with tempfile.TemporaryDirectory(prefix="hub-profile-") as tmp:
        db = sqlite3.connect(Path(tmp) / "db", isolation_level=None)
        db.execute(f"PRAGMA page_size={page_size}")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        extra = ", content TEXT UNIQUE, data BLOB" if one_row else ""
        db.execute(f"CREATE TABLE deltas (id TEXT PRIMARY KEY, device TEXT, size INTEGER{extra})")
        db.execute("CREATE TABLE inline_blobs (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL)")
        db.execute("CREATE TABLE delta_content (content TEXT PRIMARY KEY, id TEXT NOT NULL)")
        t = time.process_time()
        for b in range(deltas // batch):
            db.execute("BEGIN IMMEDIATE")
            for i in range(batch):
                sha, content = (hashlib.sha256(f"{k}{b}.{i}".encode()).hexdigest() for k in "ic")
                db.execute(f"SAVEPOINT w{i}")
                if one_row:
                    db.execute("INSERT INTO deltas VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING", (sha, "d", len(blob), content, blob))
                else:
                    db.execute("INSERT INTO deltas VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (sha, "d", len(blob)))
                    db.execute("INSERT INTO inline_blobs VALUES (?, ?) ON CONFLICT DO NOTHING", (sha, blob))
                    db.execute("INSERT INTO delta_content VALUES (?, ?) ON CONFLICT DO NOTHING", (content, sha))
                db.execute(f"RELEASE w{i}")
            db.execute("COMMIT")
        ms = (time.process_time() - t) / deltas * 1000
        db.close()
    return round(ms, 3)


def sqlite_writes() -> dict:
    return {f"{'one row' if one else 'three inserts'}, {size // 1024} KiB pages": _sqlite_commit_ms(size, one)
            for size in (4096, 32768) for one in (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uploads", type=int, default=20, help="uploads per device in the hub run")
    ap.add_argument("--name", default="hub_profile", help="results/NAME.json (hub_profile_s5: the code at 31bc7d1, "
                    "run as scripts/bench_hub_before_after.sh runs it)")
    args = ap.parse_args()
    import edgepeft

    result = {"command": f"python benchmarks/hub_profile.py --uploads {args.uploads} --name {args.name}",
              "edgepeft_from": str(Path(edgepeft.__file__).parent),
              "load_average": round(os.getloadavg()[0], 2),
              "hub_sqlite": hub_threads(args.uploads), "checks_cpu_ms": checks(),
              "sqlite_commit_cpu_ms_per_delta": sqlite_writes()}
    print(result)
    write_result(args.name, result)


if __name__ == "__main__":
    main()
