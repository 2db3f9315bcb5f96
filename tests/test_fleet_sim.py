"""A fleet simulation on loopback: hub processes (uvicorn, in subprocesses), 50+ devices training real
deltas of the tiny BERT bundle over several rounds, with faults injected.

Faults: connections cut mid-upload (a proxy in front of each hub), duplicated retries, a hub process
killed (SIGKILL) and restarted mid-round, corrupted payloads, a device of another fleet using its
token on this fleet. On PostgreSQL two hub processes share the store, devices alternate between them
and both are asked to aggregate at once. Afterwards: every accepted delta is in exactly one
aggregation, nothing corrupt was stored, no unauthorized read or write succeeded, and every device
runs the latest version.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pytest

from conftest import FlakyProxy
from edgepeft.devices.agent import Agent, AgentConfig, runtime_train_fn
from edgepeft.devices.client import HubClient, HubRefused
from edgepeft.delta.transport import is_packed
from edgepeft.hub.aggregate import parse_delta
from edgepeft.hub.backends import open_store
from edgepeft.hub.local import bundle_tar, free_port, start_hub
from edgepeft.hub.store import sha256_hex
from edgepeft.manifest import read_manifest

DEVICES = 50
ROUNDS = 3
ADMIN = "fleet-sim-admin-token-0123456789"
TRAIN = {"epochs": 1, "batch_size": 8, "max_steps": 2, "threads": 1, "checkpoint_every": 0}


class HubProcess:
    """``edgepeft hub serve`` in a subprocess on a fixed loopback port."""

    def __init__(self, uri: str, token_file: Path, log: Path) -> None:
        self.uri, self.token_file, self.log = uri, token_file, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_hub(self.uri, self.port, self.log, "--admin-token-file", str(self.token_file),
                              "--policy-interval", "0")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no graceful shutdown, in-flight requests die
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def admin(url: str) -> HubClient:
    return HubClient(url, ADMIN, retries=8, backoff=0.05, backoff_cap=1.0)


def write_data(path: Path, rng: random.Random, n: int = 16) -> None:
    lines = []
    for _ in range(n):
        label = rng.randrange(3)  # words of a label's third of the vocabulary: a learnable task
        words = " ".join(f"w{label * 30 + rng.randrange(30)}" for _ in range(rng.randrange(3, 9)))
        lines.append(json.dumps({"text": words, "label": f"LABEL_{label}"}))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(params=["sqlite", "postgresql"])
def sim_store(request, tmp_path):
    """(store URI, number of hub processes sharing it)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'hub'}", 1
    dsn = request.getfixturevalue("postgres_dsn")
    return f"{dsn}?schema=sim{uuid.uuid4().hex[:10]}", 2


def test_fleet_simulation(bundles, sim_store, tmp_path):
    started = time.time()
    uri, n_hubs = sim_store
    bundle = bundles("bert").path
    manifest = read_manifest(bundle)
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN)
    hubs = [HubProcess(uri, token_file, tmp_path / f"hub{i}.log") for i in range(n_hubs)]
    for h in hubs:
        h.start()
    proxies = [FlakyProxy(h.port) for h in hubs]
    rng = random.Random(0)
    try:
        # ---- setup through the admin API ---------------------------------------------------------
        with admin(hubs[0].url) as a:
            fp = a.request("POST", "/api/v1/bundles", content=bundle_tar(bundle)).json()["fingerprint"]
            a.request("POST", "/api/v1/fleets", json={"name": "main", "bundle": fp, "staleness": 2})
            a.request("POST", "/api/v1/fleets", json={"name": "other", "bundle": fp})
            tokens = {f"dev{i:02d}": a.request("POST", "/api/v1/fleets/main/devices", json={"device": f"dev{i:02d}"}).json()["token"]
                      for i in range(DEVICES)}
            intruder = a.request("POST", "/api/v1/fleets/other/devices", json={"device": "intruder"}).json()["token"]

        accepted: set[str] = set()  # ids the hub acknowledged, from every device's point of view
        pushed: dict[str, list[bytes]] = {}
        agents = {}
        for i, (dev, tok) in enumerate(tokens.items()):
            root = tmp_path / dev
            (root / "data").mkdir(parents=True)
            # dev00 starts without the bundle and downloads it (range requests); the rest share the export
            cfg = AgentConfig(hub=proxies[i % n_hubs].url, token=tok, bundle=str(root / "bundle") if i == 0 else str(bundle),
                              data_dir=str(root / "data"), state_dir=str(root / "state"), retries=12, backoff_s=0.05,
                              backoff_cap_s=4.0, train=TRAIN)  # outlasts a hub restart on a loaded machine
            agent = Agent(cfg, train_fn=runtime_train_fn(TRAIN))
            original = agent.client.push

            def push(data: bytes, dev=dev, original=original) -> dict:
                r = original(data)
                accepted.add(r["id"])
                pushed.setdefault(dev, []).append(data)
                return r

            agent.client.push = push
            agents[dev] = agent

        def run(dev: str):
            return agents[dev].run_once()

        refused = {"corrupt": 0, "unauthorized": 0}
        for rnd in range(ROUNDS):
            for dev in agents:
                write_data(tmp_path / dev / "data" / f"round{rnd}.jsonl", rng)
            for p in proxies:
                p.drop(6, after=300)  # connections cut mid-request, mid-upload
            order = list(agents)
            rng.shuffle(order)
            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(run, d) for d in order]
                for n, fut in enumerate(as_completed(futures)):
                    if rnd == 1 and n == DEVICES // 2:  # mid-round: SIGKILL a hub and bring it back
                        hubs[0].kill()
                        time.sleep(0.3)
                        hubs[0].start()
                reports = [f.result() for f in futures]
            assert all(r.trained == 1 for r in reports), [r for r in reports if r.trained != 1][:3]
            print(f"round {rnd + 1}: {sum(r.bytes_up for r in reports) / DEVICES / 1024:.1f} KB up, "
                  f"{sum(r.bytes_down for r in reports) / DEVICES / 1024:.1f} KB down per device")
            assert all(r.pending == 0 for r in reports), [r.offline for r in reports if r.pending][:3]

            # duplicated retries and corrupted payloads, sent straight to a hub
            for dev in rng.sample(sorted(pushed), 5):
                data = pushed[dev][-1]
                with HubClient(proxies[0].url, tokens[dev], retries=8, backoff=0.05, backoff_cap=1.0) as c:
                    assert c.push(data)["duplicate"] is True
                    bad = bytearray(data)
                    bad[len(bad) // 2] ^= 0x55
                    for body in (bytes(bad), data[: len(data) // 3], b"\0" * 64):
                        with pytest.raises(HubRefused) as e:
                            c.push(body)
                        assert e.value.status == 422
                        refused["corrupt"] += 1

            # a device of another fleet tries this fleet's data, and its own token as someone else
            with HubClient(proxies[-1].url, intruder, retries=8, backoff=0.05, backoff_cap=1.0) as c:
                attempts = [lambda: c.versions("main"),
                            lambda: c.download_version("main", "default", "latest"),
                            lambda: c.request("POST", "/api/v1/devices/dev00/deltas", content=pushed["dev00"][-1]),
                            lambda: c.request("POST", "/api/v1/fleets/main/adapters/default/aggregate"),
                            lambda: c.push(pushed["dev00"][-1])]  # someone else's delta, as itself
                for attempt in attempts:
                    with pytest.raises(HubRefused) as e:
                        attempt()
                    assert e.value.status in (401, 403)
                    refused["unauthorized"] += 1
            with HubClient(proxies[0].url, tokens["dev01"].split(".")[0] + ".forged", retries=2) as c:
                with pytest.raises(HubRefused) as e:
                    c.push(pushed["dev01"][-1])
                assert e.value.status == 401

            # aggregate; on PostgreSQL both processes are asked at once
            clients = [admin(h.url) for h in hubs]
            with ThreadPoolExecutor(len(clients)) as pool:
                outcomes = list(pool.map(lambda c: _aggregate(c), clients))
            for c in clients:
                c.close()
            made = [o for o in outcomes if o is not None]
            assert len(made) == 1, outcomes
            assert made[0]["version"] == rnd + 1

        # every device pulls the latest version
        with ThreadPoolExecutor(4) as pool:
            finals = list(pool.map(run, list(agents)))
        assert all(r.version == ROUNDS for r in finals), sorted({r.version for r in finals})
        with admin(hubs[0].url) as a:
            last = a.versions("main", "default")[-1]
        assert all(r.bytes_down == last["packed_size"] for r in finals)  # each pulled the packed form, once
        assert all(is_packed(data) for sent in pushed.values() for data in sent)  # and pushed packed

        # ---- afterwards, straight from the store ------------------------------------------------------
        store = open_store(uri)
        try:
            deltas = store.list_deltas("main")
            ids = {d.id for d in deltas}
            assert ids == accepted, (len(ids), len(accepted))
            assert len(deltas) == DEVICES * ROUNDS
            versions = store.list_versions("main")
            assert [v.version for v in versions] == list(range(1, ROUNDS + 1))
            members = [d.id for v in versions for d in store.list_deltas("main", "default", version=v.version)]
            assert sorted(members) == sorted(ids) and len(members) == len(set(members))  # each in exactly one
            assert sum(v.report["count"] for v in versions) == len(ids)
            assert store.list_deltas("main", pending=True) == []
            for d in deltas:  # nothing corrupt, nobody else's
                data = store.delta_bytes(d.id)
                assert sha256_hex(data) == d.id
                delta = parse_delta(data, d.id[:16], manifest)
                assert delta.meta.creator == d.device and d.device in tokens
            assert store.list_deltas("other") == []
            for v in versions:
                parse_delta(store.get_blob(v.sha256), f"v{v.version}", manifest)
            assert all(store.get_device(dev).last_seen for dev in tokens)
        finally:
            store.close()
        assert refused["corrupt"] == 15 * ROUNDS and refused["unauthorized"] == 5 * ROUNDS
        assert sum(p.dropped for p in proxies) >= 6 * ROUNDS
        assert (tmp_path / "dev00" / "bundle" / "weights.bin").read_bytes() == (bundle / "weights.bin").read_bytes()
    finally:
        for p in proxies:
            p.close()
        for h in hubs:
            h.stop()
    assert time.time() - started < 170


def _aggregate(c: HubClient) -> dict | None:
    try:
        return c.request("POST", "/api/v1/fleets/main/adapters/default/aggregate").json()
    except HubRefused as e:
        if e.status == 409:  # the other process took them
            return None
        raise
