"""The device side of sync: outbox on disk, client retries with backoff, the agent's round."""

from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import FlakyProxy, HubThread
from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta, save_delta
from edgepeft.devices.agent import Agent, AgentConfig
from edgepeft.devices.client import HubClient, HubRefused, backoff_delay
from edgepeft.devices.outbox import Outbox
from edgepeft.errors import HubError
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store
from edgepeft.manifest import read_manifest

ADMIN = "admin-token-for-tests-0123456789"


@pytest.fixture
def hub(tmp_path, hub_bundle):
    """(url, store, tokens, manifest) of a hub thread with fleet f (devices d1, d2) and a flaky proxy in front."""
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint)
    tokens = {d: store.add_device("f", d) for d in ("d1", "d2")}
    server = HubThread(create_app(store, admin_token=ADMIN, policy_interval_s=0))
    proxy = FlakyProxy(server.port)
    yield proxy, store, tokens, read_manifest(hub_bundle), server
    proxy.close()
    server.stop()
    store.close()


def a_delta(manifest, device, seed=0, parent=None):
    d = delta_from_init(manifest, seed)
    d.tensors["head.weight"] += np.float32(seed + 1)
    return replace_meta(d, creator=device, samples=5, parent=parent)


def test_backoff_is_exponential_with_full_jitter():
    rng = random.Random(0)
    for attempt in range(8):
        cap = min(10.0, 0.5 * 2 ** attempt)
        xs = [backoff_delay(attempt, 0.5, 10.0, rng) for _ in range(200)]
        assert 0 <= min(xs) and max(xs) <= cap and max(xs) > 0.7 * cap


def test_outbox_survives_restart(tmp_path):
    box = Outbox(tmp_path / "out")
    a = box.put(b"first", "a" * 64)
    box.put(b"second")
    assert box.put(b"first again", "a" * 64) == a  # one entry per key
    (tmp_path / "out" / ".00000-x.delta.123.tmp").write_bytes(b"half written")  # a crash mid-write
    again = Outbox(tmp_path / "out")  # a new process
    assert [i.read() for i in again.pending()] == [b"first", b"second"]

    def offline(data):
        raise HubError("unreachable")

    res = again.flush(offline)
    assert res.sent == 0 and res.left == 2 and len(Outbox(tmp_path / "out").pending()) == 2
    sent = []
    assert Outbox(tmp_path / "out").flush(sent.append).sent == 2
    assert sent == [b"first", b"second"] and Outbox(tmp_path / "out").pending() == []


def test_outbox_sets_aside_refused_deltas(tmp_path):
    box = Outbox(tmp_path / "out")
    box.put(b"bad")
    box.put(b"good")

    def push(data):
        if data == b"bad":
            raise HubRefused(422, "corrupt")

    res = box.flush(push)
    assert (res.sent, res.rejected) == (1, 1)
    assert len(list((tmp_path / "out" / "rejected").glob("*.delta"))) == 1


def test_client_retries_dropped_connections(hub):
    proxy, store, tokens, manifest, _ = hub
    delays = []
    c = HubClient(proxy.url, tokens["d1"], retries=6, backoff=0.1, backoff_cap=1.0, sleep=delays.append, seed=1)
    data = delta_bytes(a_delta(manifest, "d1"))
    proxy.drop(3, after=300)  # cut mid-upload three times
    r = c.push(data)
    assert r["duplicate"] is False and proxy.dropped == 3 and c.attempts == 4
    assert len(delays) == 3 and all(0 <= d <= min(1.0, 0.1 * 2 ** i) for i, d in enumerate(delays))
    assert c.push(data)["id"] == r["id"]  # a retry after a lost answer: stored once
    assert len(store.list_deltas("f")) == 1
    proxy.drop(100)
    with pytest.raises(HubError, match="unreachable"):
        HubClient(proxy.url, tokens["d1"], retries=2, sleep=lambda s: None).push(data)
    proxy.drop(0)
    with pytest.raises(HubRefused) as e:
        HubClient(proxy.url, "d1.wrong", retries=2, sleep=lambda s: None).me()
    assert e.value.status == 401


def _stub_train(manifest):
    calls = []

    def train(bundle_dir, data_path, start, out):
        calls.append((data_path.name, start))
        d = delta_from_init(manifest, len(calls))
        d.tensors["head.weight"] += np.float32(len(calls))
        save_delta(out, replace_meta(d, samples=3))
        return 3

    return train, calls


def test_agent_offline_then_restart_pushes_and_pulls(hub, tmp_path, hub_bundle):
    proxy, store, tokens, manifest, server = hub
    (tmp_path / "dev" / "data").mkdir(parents=True)
    (tmp_path / "dev" / "token").write_text(tokens["d1"])
    (tmp_path / "dev" / "device.toml").write_text(
        f'hub = "{proxy.url}"\ntoken_file = "token"\nbundle = "{hub_bundle}"\nretries = 1\nbackoff_s = 0.01\n')
    cfg = AgentConfig.from_toml(tmp_path / "dev" / "device.toml")
    train, calls = _stub_train(manifest)
    (tmp_path / "dev" / "data" / "a.jsonl").write_text('{"text": "w1", "label": "a"}\n')
    proxy.drop(100)  # offline
    r = Agent(cfg, train_fn=train).run_once()
    assert r.trained == 1 and r.sent == 0 and r.pending == 1 and r.offline
    assert store.list_deltas("f") == []
    proxy.drop(0)
    agent = Agent(cfg, train_fn=train)  # restarted process: the outbox is still there, the data is done
    r = agent.run_once()
    assert (r.trained, r.sent, r.pending) == (0, 1, 0) and len(calls) == 1
    from edgepeft.hub import aggregate as agg

    agg.aggregate(store, "f")
    (tmp_path / "dev" / "data" / "b.jsonl").write_text('{"text": "w2", "label": "b"}\n')
    r = agent.run_once()
    assert r.pulled and r.version == 1 and r.trained == 1 and r.sent == 1
    assert calls[-1][1] is not None  # trained from the pulled version
    latest = store.list_deltas("f", pending=True)
    assert [d.parent for d in latest] == [1] and latest[0].device == "d1"


def test_agent_pushes_nothing_when_training_did_not_beat_the_start(hub, tmp_path, hub_bundle):
    proxy, store, tokens, manifest, server = hub
    (tmp_path / "dev" / "data").mkdir(parents=True)
    (tmp_path / "dev" / "token").write_text(tokens["d1"])
    (tmp_path / "dev" / "device.toml").write_text(
        f'hub = "{proxy.url}"\ntoken_file = "token"\nbundle = "{hub_bundle}"\nretries = 1\nbackoff_s = 0.01\n')

    def unimproved(bundle_dir, data_path, start, out):  # the trainer returned its start: samples 0
        save_delta(out, replace_meta(delta_from_init(manifest, 1), samples=0))
        return 0

    (tmp_path / "dev" / "data" / "a.jsonl").write_text('{"text": "w1", "label": "a"}\n')
    agent = Agent(AgentConfig.from_toml(tmp_path / "dev" / "device.toml"), train_fn=unimproved)
    r = agent.run_once()
    assert (r.trained, r.unimproved, r.sent, r.pending) == (0, 1, 0, 0)
    assert store.list_deltas("f", pending=True) == []
    assert agent.run_once().unimproved == 0  # the data file counts as done


def test_agent_config_refuses_unknown_keys(tmp_path):
    (tmp_path / "d.toml").write_text('hub = "http://127.0.0.1:1"\ntokn = "x"\n')
    with pytest.raises(HubError, match="tokn"):
        AgentConfig.from_toml(tmp_path / "d.toml")


@pytest.mark.parametrize("raw", [False, True])
def test_agent_pushes_packed_by_default_and_raw_when_configured(hub, tmp_path, hub_bundle, raw):
    from edgepeft.delta.transport import is_packed

    proxy, store, tokens, manifest, server = hub
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "w1", "label": "a"}\n')
    cfg = AgentConfig(hub=proxy.url, token=tokens["d1"], bundle=str(hub_bundle), data_dir=str(tmp_path / "data"),
                      state_dir=str(tmp_path / "state"), retries=1, backoff_s=0.01, raw=raw)
    r = Agent(cfg, train_fn=_stub_train(manifest)[0]).run_once()
    (rec,) = store.list_deltas("f")
    assert is_packed(store.delta_bytes(rec.id)) is not raw and r.bytes_up == rec.size


def test_pull_is_the_packed_version_and_its_sha256_is_checked(hub, tmp_path, hub_bundle):
    import hashlib

    from edgepeft.delta.format import delta_from_bytes
    from edgepeft.delta.transport import is_packed, unpack
    from edgepeft.hub import aggregate as agg

    proxy, store, tokens, manifest, server = hub
    store.add_delta(*_stored(a_delta(manifest, "d1")))
    v = agg.aggregate(store, "f")
    with HubClient(proxy.url, tokens["d2"], retries=0) as c:
        number, packed = c.download_version("f", "default")
        _, raw = c.download_version("f", "default", raw=True)
        assert number == 1 and is_packed(packed) and hashlib.sha256(packed).hexdigest() == v.report["packed"]["sha256"]
        assert hashlib.sha256(raw).hexdigest() == v.sha256 and len(packed) < len(raw)
        exact, wire = delta_from_bytes(raw, "raw"), unpack(packed, "packed")
        for name, t in exact.tensors.items():  # within the transport's stated bound: max|row| / 254 (+ rounding)
            np.testing.assert_allclose(wire.tensors[name], t, rtol=0, atol=float(np.abs(t).max()) / 250 + 1e-12)
        c.http.event_hooks["response"] = [lambda r: r.headers.__setitem__("x-edgepeft-sha256", "0" * 64)]
        with pytest.raises(HubError, match="sha256"):
            c.download_version("f", "default")


def _stored(d):
    from edgepeft.hub.store import DeltaRec, sha256_hex

    data = delta_bytes(d)
    return DeltaRec(sha256_hex(data), "f", d.meta.creator, d.meta.adapter, 0, d.meta.samples, len(data), 0.0), data
