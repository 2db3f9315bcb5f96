"""Hub benchmark: upload throughput and latency for 64 concurrent devices, aggregation time and memory.

    python benchmarks/bench_hub.py [--store sqlite|URI] [--devices 64] [--uploads 8] [--client-procs 4]
                                   [--hubs 1] [--workers 1] [--out hub]

Uploads: hub subprocesses (``edgepeft hub serve [--workers N]``, uvicorn) on loopback, over one store; every device sends
distinct packed deltas of a synthetic MiniLM-sized adapter (6 layers, LoRA r=8 on query and value of
384x384, biases, a 2-label head) over its own HTTP connection, all devices at once, the devices spread
over ``--client-procs`` client processes (asyncio in each).
Aggregation: small synthetic deltas (2 LoRA modules 32x32 r=4, a bias, a 3x32 head) stored in a
SQLite store, then one ``aggregate`` over all of them; time of the whole call (claim, stream from the
store, merge, publish) and the Python-heap peak (tracemalloc) of the merge pass; with ``--aggregate-real``, the same for MiniLM-sized packed deltas.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import result_name, write_result  # noqa: E402
from edgepeft.delta.format import Delta, DeltaMeta, delta_bytes
from edgepeft.delta.transport import pack
from edgepeft.hub import aggregate as agg
from edgepeft.hub.robust import RobustOptions
from edgepeft.hub.backends import open_store
from edgepeft.hub.local import bundle_tar, free_port, start_hub
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import Graph, Manifest, Slot, write_manifest

ADMIN = "bench-admin-token-0123456789abcdef"


def synthetic_bundle(out: Path, layers: int, dim: int, rank: int, labels: int, seed: int = 0) -> Manifest:
    """A bundle directory the hub accepts (manifest, weights, placeholder graphs) with these delta shapes."""
    out.mkdir(parents=True, exist_ok=True)
    weights = np.random.default_rng(seed).standard_normal(1024).astype(np.float32).tobytes()
    (out / "weights.bin").write_bytes(weights)
    (out / "model.onnx").write_bytes(b"")  # empty ModelProtos: the hub checks, never runs, the graphs
    (out / "train.onnx").write_bytes(b"")
    slots = []
    for layer in range(layers):
        for m in ("query", "value"):
            mod = f"encoder.layer.{layer}.{m}"
            slots += [Slot(f"{mod}.lora_A", "lora_A", mod, (rank, dim), rank=rank, alpha=2.0 * rank),
                      Slot(f"{mod}.lora_B", "lora_B", mod, (dim, rank), rank=rank, alpha=2.0 * rank),
                      Slot(f"{mod}.bias", "bias", mod, (dim,))]
    slots.append(Slot("classifier.weight", "weight", "classifier", (labels, dim)))
    names = tuple(s.name for s in slots)
    manifest = Manifest(fingerprint=hashlib.sha256(weights).hexdigest(), source="synthetic", architecture="Synthetic",
                        model_type="synthetic", task="sequence-classification", method="lora+bitfit", quantization="none",
                        max_length=128, vocab_size=100, pad_token_id=0, slots=tuple(slots), labels=tuple(f"L{i}" for i in range(labels)),
                        graphs={"infer": Graph("model.onnx", ("input_ids", *names), ("logits",)),
                                "train": Graph("train.onnx", ("input_ids", "labels", *names), ("loss",))})
    write_manifest(out, manifest)
    return manifest


def random_delta(manifest: Manifest, seed: int, creator: str) -> Delta:
    rng = np.random.default_rng(seed)
    tensors = {s.name: (rng.standard_normal(s.shape) * 0.02).astype(np.float32) for s in manifest.slots}
    s = next(s for s in manifest.slots if s.rank)
    return Delta(tensors, DeltaMeta(base_fingerprint=manifest.fingerprint, method=manifest.method, rank=s.rank,
                                    alpha=s.alpha, samples=int(rng.integers(1, 100)), creator=creator))


# ---- uploads ------------------------------------------------------------------------------------

async def _device(url: str, token: str, device: str, bodies: list[bytes], latencies: list[float], start: asyncio.Event) -> int:
    """One device on one keep-alive connection, written as raw HTTP/1.1: a load generator as light as wrk. (httpx, the
    device client, spent 4.2 ms of CPU an upload here: on two cores the clients, not the hub, set the rate.)"""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on a body's tail
    head = (f"POST /api/v1/devices/{device}/deltas HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n")
    ok = 0
    await start.wait()
    for body in bodies:
        t = time.perf_counter()
        writer.write(head.format(len(body)).encode() + body)
        status, length = await _response(reader)
        latencies.append(time.perf_counter() - t)
        ok += status == 201
    writer.close()
    return ok


async def _response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """(status, body length) of one HTTP/1.1 response with a Content-Length; its body is read and dropped."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.lower() == "content-length")
    await reader.readexactly(length)
    return int(lines[0].split()[1]), length


async def _upload_all(urls: dict[str, str], tokens: dict[str, str], bodies: dict[str, list[bytes]]) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    start = asyncio.Event()
    tasks = [asyncio.create_task(_device(urls[d], tokens[d], d, bodies[d], latencies, start)) for d in tokens]
    await asyncio.sleep(0.5)  # every client connected and waiting
    t0 = time.perf_counter()
    start.set()
    ok = sum(await asyncio.gather(*tasks))
    return time.perf_counter() - t0, latencies, ok


def _client_process(urls: dict[str, str], tokens: dict[str, str], first: int, per_device: int, bundle: str, ready, out) -> None:
    """One client process: its devices' packed deltas made first, then all uploaded at once when every process is ready."""
    from edgepeft.manifest import read_manifest

    manifest = read_manifest(bundle)
    bodies = {d: [pack(random_delta(manifest, (first + i) * 1000 + k, d)) for k in range(per_device)] for i, d in enumerate(tokens)}
    ready.wait()  # every process has its bodies: the clock starts for all at once
    cpu = time.process_time()
    wall, lat, ok = asyncio.run(_upload_all(urls, tokens, bodies))
    out.put((wall, lat, ok, float(np.mean([len(b) for bs in bodies.values() for b in bs])), time.process_time() - cpu))


def _cpu_by_process(pid: int) -> dict[int, float]:
    """CPU time (user + system) so far of a process and of each of its living descendants (a hub's workers), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out = {pid: (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}
    for child in (int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()):
        out.update(_cpu_by_process(child))
    return out


def _run_clients(hub_urls: list[str], tokens: dict[str, str], per_device: int, bundle: Path, procs: int,
                 hub_pids: list[int], database_pid: int | None = None) -> dict:
    """Upload every device's deltas at once from ``procs`` client processes (device i to hub i mod len(hub_urls), as a
    proxy hashing on the device would); wall time, latencies, and the CPU seconds of the hubs and of the clients (and,
    given the database server's pid, of the server and its backends: on two cores they share the CPUs)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(procs + 1), ctx.Queue()
    names = list(tokens)
    urls = {d: hub_urls[i % len(hub_urls)] for i, d in enumerate(names)}
    parts = [names[i::procs] for i in range(procs)]
    workers = [ctx.Process(target=_client_process, args=({d: urls[d] for d in part}, {d: tokens[d] for d in part},
                                                         i * len(part), per_device, str(bundle), ready, out))
               for i, part in enumerate(parts)]
    for w in workers:
        w.start()
    ready.wait()
    load = os.getloadavg()[0]
    before = {k: v for p in hub_pids for k, v in _cpu_by_process(p).items()}
    db_before = _cpu_by_process(database_pid) if database_pid else {}
    got = [out.get(timeout=600) for _ in workers]
    used = {k: v - before.get(k, 0.0) for p in hub_pids for k, v in _cpu_by_process(p).items()}
    db_cpu = sum(v - db_before.get(k, 0.0) for k, v in _cpu_by_process(database_pid).items()) if database_pid else 0.0
    hub_cpu = sum(used.values())
    for w in workers:
        w.join()
    wall = max(g[0] for g in got)
    total = len(names) * per_device
    lat_ms = np.array([x for g in got for x in g[1]]) * 1000
    return {"devices": len(names), "client_processes": procs, "hub_processes": len(hub_urls), "uploads": total,
            "accepted": sum(g[2] for g in got), "packed_delta_bytes": round(float(np.mean([g[3] for g in got]))),
            "seconds": round(wall, 3), "uploads_per_s": round(total / wall, 1),
            "cpu_ms_per_upload": {"hubs": round(hub_cpu / total * 1000, 2),
                                  "clients": round(sum(g[4] for g in got) / total * 1000, 2),
                                  **({"database": round(db_cpu / total * 1000, 2)} if database_pid else {})},
            # cores the hubs and clients (and a database server) kept busy on average: near os.cpu_count(), the CPUs
            # bound the rate
            "cores_busy": round((hub_cpu + sum(g[4] for g in got) + db_cpu) / wall, 2),
            "load_average_before": round(load, 2),
            # each hub process's part of the hubs' CPU, largest first (with --workers: how evenly the kernel spread the
            # devices' connections over the workers; the supervisor's share is about 0)
            "hub_cpu_shares": sorted((round(v / hub_cpu, 2) for v in used.values() if v > 0.01 * hub_cpu), reverse=True),
            "latency_ms": {"p50": round(float(np.percentile(lat_ms, 50)), 1), "p99": round(float(np.percentile(lat_ms, 99)), 1),
                           "max": round(float(lat_ms.max()), 1)}}


def bench_uploads(store_uri: str | None, devices: int, per_device: int, work: Path, procs: int = 4, hubs: int = 1,
                  hub_options: tuple[str, ...] = (), workers: int = 1, database_pid: int | None = None) -> dict:
    """``hubs`` hub processes over one store, each on its own port, every device uploading at once; ``workers``:
    each hub is `hub serve --workers N` (N processes on its port); ``hub_options``: more `edgepeft hub serve` options."""
    bundle = work / "bundle"
    synthetic_bundle(bundle, layers=6, dim=384, rank=8, labels=2)
    uri = store_uri or f"sqlite://{work / 'hub'}"
    (work / "admin.token").write_text(ADMIN)
    ports = [free_port() for _ in range(hubs)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs_ = []
    try:
        for port in ports:  # the first one creates the schema before the others open the store
            procs_.append(start_hub(uri, port, work / "hub.log", "--admin-token-file", str(work / "admin.token"),
                                    "--policy-interval", "0", "--workers", str(workers), *hub_options))
        admin = httpx.Client(base_url=urls[0], headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
        fp = admin.post("/api/v1/bundles", content=bundle_tar(bundle)).json()["fingerprint"]
        admin.post("/api/v1/fleets", json={"name": "bench", "bundle": fp}).raise_for_status()
        tokens = {f"d{i:03d}": admin.post("/api/v1/fleets/bench/devices", json={"device": f"d{i:03d}"}).json()["token"]
                  for i in range(devices)}
        return {"store": uri.split("://")[0], "workers_per_hub": workers, **_run_clients(urls, tokens, per_device, bundle, procs, [p.pid for p in procs_], database_pid)}
    finally:
        for p in procs_:
            p.terminate()
            p.wait(20)


def bench_ceiling(devices: int, per_device: int, work: Path, procs: int = 4) -> dict:
    """The same clients against benchmarks/null_hub.py: the upload route with no validation and no store."""
    import subprocess

    bundle = work / "bundle"
    synthetic_bundle(bundle, layers=6, dim=384, rank=8, labels=2)
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "null_hub.py"), str(port)])
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        tokens = {f"d{i:03d}": "none" for i in range(devices)}
        return {"store": "none (benchmarks/null_hub.py)",
                **_run_clients([f"http://127.0.0.1:{port}"], tokens, per_device, bundle, procs, [proc.pid])}
    finally:
        proc.terminate()
        proc.wait(20)


# ---- aggregation --------------------------------------------------------------------------------

PLAIN = {"clip_median": None, "trim": 0.0}  # the plain weighted mean (not the hub's robust default)
PER_DELTA_TRIM = {"clip_median": None, "trim": 0.2, "buckets": 10**6}  # the trimmed mean over every delta, however many


def bench_aggregation(n: int, work: Path, options: dict | None = None, real_size: bool = False) -> dict:
    """``real_size``: MiniLM-sized packed deltas (as devices send them) instead of the small synthetic ones."""
    root = work / f"agg-{n}-{'-'.join(sorted(options or {})) or 'defaults'}{'-real' if real_size else ''}"
    manifest = synthetic_bundle(root / "bundle", layers=6, dim=384, rank=8, labels=2) if real_size else \
        synthetic_bundle(root / "bundle", layers=1, dim=32, rank=4, labels=3)
    store = open_store(str(root / "store"))
    files = {p.name: p.read_bytes() for p in (root / "bundle").iterdir()}
    store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", manifest.fingerprint)
    t = time.perf_counter()
    size = 0
    for i in range(n):
        d = random_delta(manifest, i, f"d{i % 500}")
        data = pack(d) if real_size else delta_bytes(d)
        size = len(data)
        store.add_delta(DeltaRec(sha256_hex(data), "f", f"d{i % 500}", "default", 0, 1 + i % 50, len(data), float(i)), data)
    fill = time.perf_counter() - t
    ids = [d.id for d in store.list_deltas("f", pending=True)]
    opts = RobustOptions.from_dict(options)

    def pairs():
        for delta_id, data in store.iter_delta_bytes(ids):
            d = agg.parse_delta(data, delta_id, manifest)
            yield d, float(d.meta.samples)

    tracemalloc.start()
    agg.combine(pairs, len(ids), manifest, opts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    t = time.perf_counter()
    v = agg.aggregate(store, "f", options=options)
    seconds = time.perf_counter() - t
    store.close()
    return {"deltas": n, "delta_bytes": size, "options": options or {}, "real_size": real_size, "seconds": round(seconds, 3),
            "deltas_per_s": round(n / seconds, 1), "peak_python_heap_mb": round(peak / 2**20, 2),
            "aggregated": v.report["count"], "store_fill_seconds": round(fill, 1)}


def _filled_store(n: int, root: Path) -> tuple[object, Manifest, list[DeltaRec]]:
    """A SQLite store holding ``n`` distinct MiniLM-size packed deltas (as devices send them), claimed for version 1."""
    manifest = synthetic_bundle(root / "bundle", layers=6, dim=384, rank=8, labels=2)
    store = open_store(str(root / "store"))
    files = {p.name: p.read_bytes() for p in (root / "bundle").iterdir()}
    store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", manifest.fingerprint)
    for i in range(n):
        data = pack(random_delta(manifest, i, f"d{i % 500}"))
        store.add_delta(DeltaRec(sha256_hex(data), "f", f"d{i % 500}", "default", 0, 1 + i % 50, len(data), float(i)), data)
    version, _ = store.claim_version("f", "default", {})
    return store, manifest, store.list_deltas("f", "default", version=version)


class _RssPeak:
    """The largest resident set size seen (sampled every 5 ms from /proc) while the block runs, minus the one before."""

    def __enter__(self) -> "_RssPeak":
        import threading

        self.start = self.peak = self._rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @property
    def growth_mb(self) -> float:
        return round((self.peak - self.start) / 2**20, 1)


def _merge_row(store, manifest: Manifest, claimed: list[DeltaRec], options: dict, label: str,
               blas_threads: int | None = None) -> dict:
    """Merge ``claimed`` as build_version does (the hub's BLAS threads, or ``blas_threads``; its merge threads,
    aggregate.merge_threads()): wall and CPU seconds, RSS growth, then once more under tracemalloc for the Python-heap
    peak."""
    from threadpoolctl import threadpool_limits

    opts = RobustOptions.from_dict(options)

    def merge() -> dict:
        with threadpool_limits(blas_threads or agg.MERGE_BLAS_THREADS, user_api="blas"):
            return agg._merge_claimed(store, claimed, 0, manifest, opts, agg._Parents(store, "f", "default", manifest), None)[1]

    cpu, t = time.process_time(), time.perf_counter()
    with _RssPeak() as rss:
        report = merge()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    tracemalloc.start()
    merge()
    heap = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"path": label, "deltas": len(claimed), "options": options, "seconds": round(seconds, 3),
            "deltas_per_s": round(len(claimed) / seconds, 1), "cpu_seconds": round(cpu, 2),
            "peak_rss_growth_mb": rss.growth_mb, "peak_python_heap_mb": round(heap / 2**20, 1),
            "passes": report["passes"], "reread": report.get("reread"), "trimmed": report.get("trimmed"),
            "merge_threads": agg.merge_threads(), "blas_threads": blas_threads or agg.MERGE_BLAS_THREADS,
            "load_average": round(os.getloadavg()[0], 2)}


def _phases(store, manifest: Manifest, claimed: list[DeltaRec]) -> dict:
    """Where the plain mean's CPU goes, measured apart: reading and decompressing the chunks alone (the reading thread's
    work), and the products' floor: their GFLOP at this machine's one-thread sgemm speed on the merge's own shape."""
    from threadpoolctl import threadpool_limits

    from edgepeft.hub import delta_chunks

    ids = [d.id for d in claimed]
    cpu, t = time.process_time(), time.perf_counter()
    count = sum(len(c) for c in delta_chunks.chunks(store.iter_delta_bytes(ids), manifest))
    read = {"cpu_seconds": round(time.process_time() - cpu, 2), "seconds": round(time.perf_counter() - t, 2)}
    d, r, k = 384, 8, delta_chunks.CHUNK
    a, b = np.ones((d, k * r), np.float32), np.ones((k * r, d), np.float32)
    with threadpool_limits(1, user_api="blas"):
        a @ b
        t = time.perf_counter()
        for _ in range(50):
            a @ b
        gflops = 50 * 2 * d * d * k * r / (time.perf_counter() - t) / 1e9
    gflop = count * 12 * 2 * d * d * r / 1e9
    return {"deltas": count, "read_and_decompress": read, "sgemm_gflops_one_thread": round(gflops, 1),
            "products_gflop": round(gflop, 1), "products_cpu_seconds_at_that_speed": round(gflop / gflops, 2)}


def _profile(store, manifest: Manifest, claimed: list[DeltaRec], top: int = 8) -> list[dict]:
    """cProfile of one merge of ``claimed`` (the hub's BLAS threads): the functions that took the most time of their own."""
    import cProfile
    import pstats

    from threadpoolctl import threadpool_limits

    opts = RobustOptions.from_dict(PLAIN)
    prof = cProfile.Profile()
    kept = agg.MERGE_THREADS
    agg.MERGE_THREADS = 1  # cProfile sees one thread: the merge's work on it (the reading thread's is apart)
    try:
        with threadpool_limits(agg.MERGE_BLAS_THREADS, user_api="blas"):
            prof.enable()
            agg._merge_claimed(store, claimed, 0, manifest, opts, agg._Parents(store, "f", "default", manifest), None)
            prof.disable()
    finally:
        agg.MERGE_THREADS = kept
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = sorted(((tt, f"{Path(f).name}:{line}({name})") for (f, line, name), (_, _, tt, _, _) in stats.items()), reverse=True)
    return [{"function": where, "seconds": round(tt, 3)} for tt, where in rows[:top]]


def bench_merge_scale(counts: list[int], out: str = "hub_agg") -> None:
    """Merging 1,000 and 10,000 MiniLM-size packed deltas: the chunked merge (plain mean, median clipping, a server
    step, the hub's defaults: the trimmed mean over buckets), the per-delta merge it replaced (at the smallest count), the trimmed mean's cost, and both profiles."""
    from edgepeft.hub import stream_merge

    load_before = round(os.getloadavg()[0], 2)
    rows, profiles, phases = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-hub-merge-") as tmp:
        for n in counts:
            t = time.perf_counter()
            store, manifest, claimed = _filled_store(n, Path(tmp) / str(n))
            print(f"{n} deltas stored in {time.perf_counter() - t:.0f} s", flush=True)
            for label, options in (("chunked", PLAIN), ("chunked", {"trim": 0.0}),
                                   ("chunked", {"trim": 0.0, "server_lr": 0.7, "server_momentum": 0.9}),
                                   ("chunked", {})):  # the hub's defaults: median clipping, 20 % trimmed over 32 buckets
                rows.append(_merge_row(store, manifest, claimed, options, label))
                print(json.dumps(rows[-1]), flush=True)
            phases[str(n)] = _phases(store, manifest, claimed)
            print(json.dumps(phases[str(n)]), flush=True)
            if n == counts[-1]:  # both cores to BLAS's own threads instead of the merge's: the alternative, once
                kept = agg.MERGE_THREADS
                agg.MERGE_THREADS = 1
                try:
                    rows.append(_merge_row(store, manifest, claimed, PLAIN, "chunked, BLAS threads", os.cpu_count()))
                    print(json.dumps(rows[-1]), flush=True)
                finally:
                    agg.MERGE_THREADS = kept
            if n == counts[0]:
                profiles["chunked"] = _profile(store, manifest, claimed)
                eligible = stream_merge.eligible
                stream_merge.eligible = lambda *_: False  # type: ignore[assignment]  # per delta: the merge before, and DoRA's path
                try:
                    rows.append(_merge_row(store, manifest, claimed, PLAIN, "per delta (before)"))
                    print(json.dumps(rows[-1]), flush=True)
                    profiles["per delta (before)"] = _profile(store, manifest, claimed)
                    for k in (50, 100):  # the trimmed mean over every delta: passes grow with n, each reads every delta
                        rows.append(_merge_row(store, manifest, claimed[:k], PER_DELTA_TRIM, "per delta, trimmed"))
                        print(json.dumps(rows[-1]), flush=True)
                    rows.append(_merge_row(store, manifest, claimed, {}, "per delta, defaults"))  # over 32 bucket means
                    print(json.dumps(rows[-1]), flush=True)
                finally:
                    stream_merge.eligible = eligible  # type: ignore[assignment]
            store.close()
    usage = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF)
    write_result(out, {
        "command": f"python benchmarks/bench_hub.py --merge-scale {','.join(map(str, counts))}" + _out_flag(out, "hub_agg"),
        "load_average": round(os.getloadavg()[0], 2), "merge_blas_threads": agg.MERGE_BLAS_THREADS,
        "merge_threads": agg.merge_threads(), "load_average_before": load_before,
        "process_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "rows": rows, "phases": phases,
        "profile": profiles})


def _out_flag(out: str, default: str) -> str:
    """The ``--out`` part of a run's recorded command: empty for the mode's default name."""
    return f" --out {out}" if out != default else ""


def bench_blas(n: int, out: str = "hub_blas") -> None:
    """The chunked merge of ``n`` MiniLM-size packed deltas at the hub's one BLAS thread (aggregate.MERGE_BLAS_THREADS)
    and at the library's default, on one store, in one process, alternating twice."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-blas-") as tmp:
        store, manifest, claimed = _filled_store(n, Path(tmp))
        kept = agg.MERGE_BLAS_THREADS
        try:
            for threads in (1, None, 1, None):
                agg.MERGE_BLAS_THREADS = threads
                rows.append({"blas_threads": threads or "default", **_merge_row(store, manifest, claimed, PLAIN, "chunked")})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            agg.MERGE_BLAS_THREADS = kept
        store.close()
    best = {t: min(r["seconds"] for r in rows if r["blas_threads"] == t) for t in (1, "default")}
    write_result(out, {
        "load_average": round(os.getloadavg()[0], 2), "command": f"python benchmarks/bench_hub.py --blas {n}" + _out_flag(out, "hub_blas"),
        "rows": rows,
        "best_seconds": best, "speedup_one_thread": round(best["default"] / best[1], 2)})


def _durable_postgres() -> tuple[str, str]:
    """(DSN, data dir) of a throwaway PostgreSQL with fsync and synchronous commit on."""
    import subprocess

    script = Path(__file__).parent.parent / ".ci" / "postgres.sh"
    out = subprocess.run(["bash", str(script), "--no-install"], capture_output=True, text=True, check=True,
                         env={**os.environ, "EDGEPEFT_PG_DURABLE": "1"}).stdout
    env = dict(line.removeprefix("export ").split("=", 1) for line in out.splitlines() if line.startswith("export "))
    return env["EDGEPEFT_TEST_POSTGRES"], env["EDGEPEFT_TEST_POSTGRES_DIR"]


def bench_upload_paths(devices: int, per_device: int, procs: int, out: str = "hub_uploads") -> None:
    """The HTTP ceiling, one hub on SQLite (and `hub serve --workers 2` on it) and two hubs on PostgreSQL, the same
    clients, back to back."""
    import subprocess

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-hub-up-") as tmp:
        for name, run in (("ceiling", lambda w: bench_ceiling(devices, per_device, w, procs)),
                          ("sqlite, 1 hub", lambda w: bench_uploads(None, devices, per_device, w, procs)),
                          ("sqlite, 1 hub, 40 threads (anyio's default)",
                           lambda w: bench_uploads(None, devices, per_device, w, procs, hub_options=("--threads", "40"))),
                          ("sqlite, 2 workers", lambda w: bench_uploads(None, devices, per_device, w, procs, workers=2))):
            (Path(tmp) / name).mkdir()
            rows.append({"run": name, **run(Path(tmp) / name)})
            print(json.dumps(rows[-1]), flush=True)
        dsn, pgdir = _durable_postgres()
        try:
            (Path(tmp) / "pg").mkdir()
            postmaster = int((Path(pgdir) / "data" / "postmaster.pid").read_text().split()[0])
            rows.append({"run": "postgresql, 2 hubs", **bench_uploads(dsn, devices, per_device, Path(tmp) / "pg", procs, hubs=2,
                                                                     database_pid=postmaster)})
            print(json.dumps(rows[-1]), flush=True)
            # the same, with blobs in a folder both hubs share (?blobs=DIR): the database keeps metadata only
            (Path(tmp) / "pg-folder").mkdir()
            rows.append({"run": "postgresql, 2 hubs, blob folder",
                         **bench_uploads(f"{dsn}?schema=folder&blobs={Path(tmp) / 'pg-folder' / 'blobs'}", devices, per_device,
                                         Path(tmp) / "pg-folder", procs, hubs=2, database_pid=postmaster)})
            print(json.dumps(rows[-1]), flush=True)
        finally:
            subprocess.run(["bash", str(Path(__file__).parent.parent / ".ci" / "postgres.sh"), "stop", pgdir], check=False)
    ceiling = rows[0]["uploads_per_s"]
    write_result(out, {
        "command": f"python benchmarks/bench_hub.py --uploads-only --devices {devices} --uploads {per_device} --client-procs {procs}"
                   + _out_flag(out, "hub_uploads"),
        "load_average": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
        "rows": rows, "fraction_of_ceiling": {r["run"]: round(r["uploads_per_s"] / ceiling, 3) for r in rows[1:]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="store URI for the upload part (default: a SQLite store in a temp dir)")
    ap.add_argument("--devices", type=int, default=64, help="concurrent devices")
    ap.add_argument("--uploads", type=int, default=8, help="uploads per device")
    ap.add_argument("--client-procs", type=int, default=4, help="client processes the devices are spread over")
    ap.add_argument("--hubs", type=int, default=1, help="hub processes on the store, each on its own port (devices "
                    "alternate between them)")
    ap.add_argument("--workers", type=int, default=1, help="`hub serve --workers N` for each hub (N processes on its port)")
    ap.add_argument("--aggregate", default="1000,10000", help="delta counts for the aggregation part")
    ap.add_argument("--aggregate-real", default="1000", help="delta counts for aggregating MiniLM-sized packed deltas")
    ap.add_argument("--out", type=result_name, help="the result's name under benchmarks/results (default: hub, or "
                    "hub_blas, hub_uploads, hub_agg for the single-part runs below)")
    ap.add_argument("--blas", type=int, default=0, metavar="N", help="only this: merge N MiniLM-sized packed deltas with one "
                    "BLAS thread (the hub's setting) and with the BLAS default, alternating; writes results/hub_blas.json")
    ap.add_argument("--uploads-name", dest="out", type=result_name, help=argparse.SUPPRESS)  # the older spelling of --out
    ap.add_argument("--uploads-only", action="store_true", help="only this: uploads against the HTTP ceiling "
                    "(benchmarks/null_hub.py), one hub on SQLite, and two hubs on one durable PostgreSQL (started by "
                    ".ci/postgres.sh), back to back; writes results/hub_uploads.json")
    ap.add_argument("--merge-scale", default="", metavar="N,N", help="only this: merge N MiniLM-size packed deltas "
                    "(chunked: plain mean, median clipping, server step, the defaults (trimmed over buckets); before: per delta, and "
                    "the per-delta trimmed mean) with "
                    "time, CPU, memory and profiles; writes results/hub_agg.json")
    args = ap.parse_args()
    if args.merge_scale:
        return bench_merge_scale([int(x) for x in args.merge_scale.split(",")], args.out or "hub_agg")
    if args.blas:
        return bench_blas(args.blas, args.out or "hub_blas")
    if args.uploads_only:
        return bench_upload_paths(args.devices, args.uploads, args.client_procs, args.out or "hub_uploads")
    with tempfile.TemporaryDirectory(prefix="bench-hub-") as tmp:
        work = Path(tmp)
        result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
                  "uploads": bench_uploads(args.store, args.devices, args.uploads, work, args.client_procs, hubs=args.hubs,
                                           workers=args.workers)}
        print(json.dumps(result["uploads"]), flush=True)
        result["aggregation"] = []
        for n in (int(x) for x in args.aggregate.split(",")):
            result["aggregation"].append(bench_aggregation(n, work, PLAIN))  # the streaming mean, as README states it
            print(json.dumps(result["aggregation"][-1]), flush=True)
        first = int(args.aggregate.split(",")[0])
        result["aggregation"].append(bench_aggregation(first, work, {"clip_norm": 0.5, "trim": 0.1}))
        result["aggregation"].append(bench_aggregation(first, work, {}))  # the hub's defaults: median clipping, 20 % trim
        print(json.dumps(result["aggregation"][-1]), flush=True)
        for n in (int(x) for x in args.aggregate_real.split(",") if x):
            result["aggregation"].append(bench_aggregation(n, work, PLAIN, real_size=True))
            print(json.dumps(result["aggregation"][-1]), flush=True)
    print(f"wrote {write_result(args.out or 'hub', result)}")


if __name__ == "__main__":
    main()
