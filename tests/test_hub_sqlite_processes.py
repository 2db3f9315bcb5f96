"""Several hub processes on one SQLite store (``hub serve --workers N``, or N ``hub serve`` on one folder): what one
process guarantees alone still holds, because it lives in the database (hub/workers.py): a delta is stored once and
goes into one version once, and a token revoked through one process uploads nothing through another."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from edgepeft.delta.format import delta_from_init, replace_meta
from edgepeft.delta.transport import pack
from edgepeft.hub.backends import open_store
from edgepeft.hub.local import bundle_tar, free_port, start_hub
from edgepeft.manifest import read_manifest

ADMIN = "admin-token-for-tests-0123456789"
DEVICES, UPLOADS = 8, 6


def _packed(manifest, device: str, seed: int) -> bytes:
    d = delta_from_init(manifest, seed)
    d.tensors["head.weight"] += np.float32(0.01 * (seed + 1))  # every delta's content its own
    return pack(replace_meta(d, creator=device, samples=1 + seed % 7))


def _hubs(tmp_path: Path, *options: str, count: int) -> tuple[list, list[str]]:
    (tmp_path / "admin.token").write_text(ADMIN)
    procs, urls = [], []
    for _ in range(count):  # the first makes the schema before the next opens the store
        port = free_port()
        procs.append(start_hub(tmp_path / "store", port, tmp_path / "hub.log", "--admin-token-file",
                               str(tmp_path / "admin.token"), "--policy-interval", "0", *options))
        urls.append(f"http://127.0.0.1:{port}")
    return procs, urls


def _fleet(url: str, bundle: Path, aggregate_every: int) -> dict[str, str]:
    """Fleet f of DEVICES devices on ``bundle``; their tokens."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60) as admin:
        fp = admin.post("/api/v1/bundles", content=bundle_tar(bundle)).json()["fingerprint"]
        admin.post("/api/v1/fleets", json={"name": "f", "bundle": fp, "staleness": 1000,
                                           "aggregate_every": aggregate_every}).raise_for_status()
        return {f"d{i}": admin.post("/api/v1/fleets/f/devices", json={"device": f"d{i}"}).json()["token"]
                for i in range(DEVICES)}


def _stop(procs: list) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait(30)


@pytest.fixture
def two_hubs(tmp_path, hub_bundle):
    """(urls, tokens, store dir): two `hub serve` processes on one SQLite folder, fleet f aggregating every 5 deltas."""
    procs, urls = _hubs(tmp_path, count=2)
    try:
        yield urls, _fleet(urls[0], hub_bundle, aggregate_every=5), tmp_path / "store"
    finally:
        _stop(procs)


def test_deltas_uploaded_and_aggregated_through_two_processes_are_each_stored_once_and_merged_once(two_hubs, hub_bundle):
    urls, tokens, store_dir = two_hubs
    manifest = read_manifest(hub_bundle)
    accepted: list[str] = []
    lock = threading.Lock()

    def device(i: int) -> None:  # device i alternates hubs, so both processes accept and claim at once
        name = f"d{i}"
        for k in range(UPLOADS):
            r = httpx.post(f"{urls[(i + k) % 2]}/api/v1/devices/{name}/deltas", content=_packed(manifest, name, i * 100 + k),
                           headers={"Authorization": f"Bearer {tokens[name]}"}, timeout=60)
            assert r.status_code == 201, r.text
            with lock:
                accepted.append(r.json()["id"])

    def aggregate(url: str) -> None:  # admins aggregating meanwhile, through both processes
        for _ in range(4):
            httpx.post(f"{url}/api/v1/fleets/f/adapters/default/aggregate", headers={"Authorization": f"Bearer {ADMIN}"},
                       timeout=60)

    with ThreadPoolExecutor(DEVICES + 2) as pool:
        for f in [*(pool.submit(device, i) for i in range(DEVICES)), *(pool.submit(aggregate, u) for u in urls)]:
            f.result()
    httpx.post(f"{urls[1]}/api/v1/fleets/f/adapters/default/aggregate", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)

    store = open_store(str(store_dir))
    try:
        deltas = store.list_deltas("f")
        versions = store.list_versions("f", "default", state=None)
    finally:
        store.close()
    assert sorted(d.id for d in deltas) == sorted(accepted) and len(set(accepted)) == DEVICES * UPLOADS
    assert all(d.version is not None for d in deltas), "a delta left pending after the last aggregation"
    assert [v.version for v in versions] == list(range(1, len(versions) + 1)) and all(v.state == "published" for v in versions)
    merged = {v.version: v.report["count"] for v in versions}
    claimed = {v.version: sum(d.version == v.version for d in deltas) for v in versions}
    assert merged == claimed and sum(merged.values()) == DEVICES * UPLOADS
    assert max(merged.values()) <= 5 and len(versions) >= DEVICES * UPLOADS // 5  # FedBuff's K = aggregate_every


def test_a_token_revoked_through_one_process_uploads_nothing_through_the_other(two_hubs, hub_bundle):
    urls, tokens, _ = two_hubs
    manifest = read_manifest(hub_bundle)
    auth = {"Authorization": f"Bearer {tokens['d0']}"}
    first = httpx.post(f"{urls[1]}/api/v1/devices/d0/deltas", content=_packed(manifest, "d0", 1), headers=auth, timeout=60)
    assert first.status_code == 201  # the second process now holds d0's token in its cache
    httpx.delete(f"{urls[0]}/api/v1/fleets/f/devices/d0/token", headers={"Authorization": f"Bearer {ADMIN}"},
                 timeout=60).raise_for_status()
    r = httpx.post(f"{urls[1]}/api/v1/devices/d0/deltas", content=_packed(manifest, "d0", 2), headers=auth, timeout=60)
    assert r.status_code == 401 and "revoked or rotated" in r.json()["detail"]


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir() for c in (t / "children").read_text().split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_hub_serve_workers_runs_that_many_processes_on_one_port_which_stop_when_it_is_killed(tmp_path, hub_bundle):
    procs, urls = _hubs(tmp_path, "--workers", "2", count=1)
    try:
        tokens = _fleet(urls[0], hub_bundle, aggregate_every=0)
        manifest = read_manifest(hub_bundle)
        codes = [httpx.post(f"{urls[0]}/api/v1/devices/{d}/deltas", content=_packed(manifest, d, i),
                            headers={"Authorization": f"Bearer {t}"}, timeout=60).status_code
                 for i, (d, t) in enumerate(tokens.items())]
        workers = [c for c in _children(procs[0].pid) if "--multiprocessing-fork" in Path(f"/proc/{c}/cmdline").read_text()
                   and "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text()]
        procs[0].kill()  # SIGKILL: the supervisor runs no cleanup of its own
        procs[0].wait(30)
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _stop(procs)
    assert codes == [201] * DEVICES
    assert len(workers) == 2
    assert not any(_alive(w) for w in workers), "a worker outlived its killed supervisor"
