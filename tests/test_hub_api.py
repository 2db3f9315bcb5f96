"""The hub's HTTP API in process (FastAPI TestClient): auth, limits, validation, idempotency, ranges."""

from __future__ import annotations

import io
import sqlite3
import tarfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta
from edgepeft.delta.transport import pack
from edgepeft.hub.app import create_app
from edgepeft.hub.auth import get_store
from edgepeft.hub.backends import open_store
from edgepeft.manifest import read_manifest

ADMIN = "admin-token-for-tests-0123456789"


def bundle_tar(bundle_dir) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(bundle_dir.iterdir()):
            tar.add(p, arcname=p.name)
    return buf.getvalue()


def H(token):
    return {"Authorization": f"Bearer {token}"}


def make_delta(manifest, device, seed=0, parent=None, samples=10, adapter="default") -> bytes:
    d = delta_from_init(manifest, seed, adapter=adapter)
    d.tensors["head.weight"] += np.float32(0.01 * (seed + 1))
    return delta_bytes(replace_meta(d, creator=device, parent=parent, samples=samples))


@pytest.fixture
def hub(tmp_path, hub_bundle):
    """(client, manifest, tokens): fleets f1 (devices a, b) and f2 (device c) on one bundle."""
    store = open_store(str(tmp_path / "store"))
    app = create_app(store, admin_token=ADMIN, max_upload_bytes=64 * 1024, policy_interval_s=0)
    with TestClient(app) as client:
        r = client.post("/api/v1/bundles", content=bundle_tar(hub_bundle), headers=H(ADMIN))
        assert r.status_code == 201, r.text
        fp = r.json()["fingerprint"]
        tokens = {}
        for fleet, devs in {"f1": ["a", "b"], "f2": ["c"]}.items():
            assert client.post("/api/v1/fleets", json={"name": fleet, "bundle": fp, "staleness": 1}, headers=H(ADMIN)).status_code == 201
            for d in devs:
                r = client.post(f"/api/v1/fleets/{fleet}/devices", json={"device": d}, headers=H(ADMIN))
                assert r.status_code == 201
                tokens[d] = r.json()["token"]
        yield client, read_manifest(hub_bundle), tokens, store
    store.close()


def test_openapi_served(hub):
    client, *_ = hub
    spec = client.get("/openapi.json").json()
    assert "/api/v1/devices/{device_id}/deltas" in spec["paths"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert client.get("/docs").status_code == 200


def test_auth_401_and_403(hub):
    client, manifest, tokens, store = hub
    data = make_delta(manifest, "a")
    assert client.post("/api/v1/devices/a/deltas", content=data).status_code == 401
    assert client.post("/api/v1/devices/a/deltas", content=data, headers=H("a.wrong")).status_code == 401
    assert client.post("/api/v1/devices/a/deltas", content=data, headers=H(tokens["b"])).status_code == 403  # not itself
    forged = make_delta(manifest, "b")  # creator b, sent with a's token to a's path
    assert client.post("/api/v1/devices/a/deltas", content=forged, headers=H(tokens["a"])).status_code == 403
    assert client.post("/api/v1/fleets", json={"name": "x", "bundle": "y"}, headers=H(tokens["a"])).status_code == 403
    assert client.post("/api/v1/fleets/f1/adapters/default/aggregate", headers=H(tokens["a"])).status_code == 403
    assert client.get("/api/v1/fleets/f1/versions", headers=H(tokens["c"])).status_code == 403  # other fleet
    assert client.get("/api/v1/fleets/f1/versions", headers=H(tokens["a"])).status_code == 200
    assert client.get("/", headers=H(tokens["a"])).status_code == 401  # the login form
    assert client.get("/").status_code == 401
    assert store.list_deltas("f1") == []


def test_upload_idempotent_and_packed(hub):
    client, manifest, tokens, store = hub
    data = make_delta(manifest, "a", seed=1)
    r1 = client.post("/api/v1/devices/a/deltas", content=data, headers=H(tokens["a"]))
    r2 = client.post("/api/v1/devices/a/deltas", content=data, headers=H(tokens["a"]))
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r2.json()["duplicate"] is True and r1.json()["id"] == r2.json()["id"]
    from edgepeft.delta.format import delta_from_bytes

    packed = pack(delta_from_bytes(make_delta(manifest, "a", seed=2), "x"))
    assert client.post("/api/v1/devices/a/deltas", content=packed, headers=H(tokens["a"])).status_code == 201
    assert len(store.list_deltas("f1")) == 2
    # another device re-sending a's bytes is refused
    assert client.post("/api/v1/devices/b/deltas", content=data, headers=H(tokens["b"])).status_code == 403


def test_413_over_limit(hub):
    client, manifest, tokens, store = hub
    r = client.post("/api/v1/devices/a/deltas", content=b"\0" * (64 * 1024 + 1), headers=H(tokens["a"]))
    assert r.status_code == 413
    assert store.list_deltas("f1") == []


def test_validation_refuses_and_stores_nothing(hub, tmp_path):
    from conftest import make_hub_bundle

    client, manifest, tokens, store = hub
    good = make_delta(manifest, "a", seed=3)
    corrupt = bytearray(good)
    corrupt[-5] ^= 0xFF  # a flipped bit in the tensor data: checksum mismatch
    other = read_manifest(make_hub_bundle(tmp_path / "other", seed=7))
    cases = {
        "corrupt": bytes(corrupt),
        "truncated": good[: len(good) // 2],
        "garbage": b"not a delta at all",
        "another base": make_delta(other, "a"),
        "zero samples": make_delta(manifest, "a", samples=0),
        "bad packed": b"EPDQ\x01" + b"\x28\xb5\x2f\xfd" + b"junk",
    }
    for why, body in cases.items():
        r = client.post("/api/v1/devices/a/deltas", content=body, headers=H(tokens["a"]))
        assert r.status_code == 422, (why, r.status_code, r.text)
        assert "\n" not in r.json()["detail"]
    assert store.list_deltas("f1") == []
    # parent from the future / stale parent: 409
    assert client.post("/api/v1/devices/a/deltas", content=make_delta(manifest, "a", parent=5),
                       headers=H(tokens["a"])).status_code == 409
    assert store.list_deltas("f1") == []


def test_stale_parent_refused(hub):
    client, manifest, tokens, store = hub
    for i in range(2):  # publish v1, v2
        r = client.post("/api/v1/fleets/f1/adapters/default/versions", content=make_delta(manifest, "", seed=10 + i), headers=H(ADMIN))
        assert r.status_code == 201, r.text
    r = client.post("/api/v1/devices/a/deltas", content=make_delta(manifest, "a", parent=None), headers=H(tokens["a"]))
    assert r.status_code == 409 and "stale" in r.json()["detail"]  # staleness 1: v0 is 2 behind v2
    assert client.post("/api/v1/devices/a/deltas", content=make_delta(manifest, "a", parent=1), headers=H(tokens["a"])).status_code == 201


def test_aggregate_and_download_with_ranges(hub):
    client, manifest, tokens, store = hub
    for i, dev in enumerate(["a", "b"]):
        assert client.post(f"/api/v1/devices/{dev}/deltas", content=make_delta(manifest, dev, seed=i),
                           headers=H(tokens[dev])).status_code == 201
    r = client.post("/api/v1/fleets/f1/adapters/default/aggregate", headers=H(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["version"] == 1 and r.json()["report"]["count"] == 2
    assert client.post("/api/v1/fleets/f1/adapters/default/aggregate", headers=H(ADMIN)).status_code == 409
    info = client.get("/api/v1/fleets/f1/adapters/default/versions/1/info", headers=H(ADMIN)).json()
    assert len(info["deltas"]) == 2
    whole = client.get("/api/v1/fleets/f1/adapters/default/versions/latest", headers=H(tokens["a"]))
    assert whole.status_code == 200 and whole.headers["x-edgepeft-version"] == "1"
    part = client.get("/api/v1/fleets/f1/adapters/default/versions/1", headers={**H(tokens["b"]), "Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == whole.content[10:]
    assert part.headers["content-range"] == f"bytes 10-{len(whole.content) - 1}/{len(whole.content)}"
    assert client.get("/api/v1/fleets/f1/adapters/default/versions/1", headers=H(tokens["c"])).status_code == 403
    bad = client.get("/api/v1/fleets/f1/adapters/default/versions/1", headers={**H(tokens["a"]), "Range": "bytes=999999-"})
    assert bad.status_code == 416


def test_bundle_download_resumes_with_range(hub, hub_bundle):
    client, manifest, tokens, store = hub
    fp = manifest.fingerprint
    weights = (hub_bundle / "weights.bin").read_bytes()
    first = client.get(f"/api/v1/bundles/{fp}/files/weights.bin", headers={**H(tokens["a"]), "Range": "bytes=0-99"})
    rest = client.get(f"/api/v1/bundles/{fp}/files/weights.bin", headers={**H(tokens["a"]), "Range": "bytes=100-"})
    assert first.status_code == rest.status_code == 206
    assert first.content + rest.content == weights
    assert client.get(f"/api/v1/bundles/{fp}/files/weights.bin", headers=H(tokens["c"])).content == weights
    assert client.get(f"/api/v1/bundles/{fp}/files/..%2Fhub.sqlite3", headers=H(tokens["a"])).status_code == 404
    assert client.get(f"/api/v1/bundles/{fp}/files/weights.bin").status_code == 401


def test_bundle_upload_checked(hub, hub_bundle, tmp_path):
    client, *_ = hub
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    assert client.post("/api/v1/bundles", content=evil.getvalue(), headers=H(ADMIN)).status_code == 422
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in hub_bundle.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    (broken / "weights.bin").write_bytes(b"tampered")
    r = client.post("/api/v1/bundles", content=bundle_tar(broken), headers=H(ADMIN))
    assert r.status_code == 422 and "fingerprint" in r.json()["detail"]


def test_metrics_and_status_page(hub):
    client, manifest, tokens, store = hub
    assert client.post("/api/v1/devices/a/metrics", json={"values": {"accuracy": 0.5}}, headers=H(tokens["a"])).status_code == 201
    assert client.post("/api/v1/devices/b/metrics", json={"values": {"accuracy": 0.5}}, headers=H(tokens["a"])).status_code == 403
    page = client.get("/", headers=H(ADMIN))
    assert page.status_code == 200 and "f1" in page.text and "<svg" in page.text and "<script" not in page.text


def test_store_swapped_through_dependency_override(hub, tmp_path):
    client, *_ = hub
    other = open_store(str(tmp_path / "empty"))
    client.app.dependency_overrides[get_store] = lambda: other
    try:
        assert client.get("/api/v1/fleets", headers=H(ADMIN)).json() == []
    finally:
        client.app.dependency_overrides.clear()
        other.close()
    assert len(client.get("/api/v1/fleets", headers=H(ADMIN)).json()) == 2


def _with_rank(manifest, device, rank: int, alpha: float) -> bytes:
    """A delta whose LoRA pairs have another rank and alpha than the fleet's bundle (another method config)."""
    from edgepeft.delta.format import Delta

    d = delta_from_init(manifest, 0)
    t = {k: (v[:rank] if k.endswith("lora_A") else v[:, :rank] if k.endswith("lora_B") else v) for k, v in d.tensors.items()}
    return delta_bytes(replace_meta(Delta(t, d.meta), rank=rank, alpha=alpha, creator=device, samples=10))


@pytest.mark.parametrize("odd, says", [
    (lambda m: delta_bytes(replace_meta(delta_from_init(m, 0), method="ia3", creator="a", samples=10)), "trained with method 'ia3'"),
    # same scale, lower rank: a rank the fleet could take (hub/mixed_ranks.py), but this fleet takes only the bundle's
    (lambda m: _with_rank(m, "a", 2, 4.0), "delta has LoRA rank 2, but this fleet takes rank 4 of its lora+bitfit bundle"),
    (lambda m: _with_rank(m, "a", 4, 16.0), "rank 4, alpha 16, but this fleet's bundle trains lora+bitfit at rank 4, alpha 8"),
    (lambda m: pack(replace_meta(delta_from_init(m, 0), method="dora", creator="a", samples=10)), "trained with method 'dora'"),
], ids=["method", "rank", "alpha", "packed-method"])
def test_a_delta_of_another_method_or_config_is_refused_with_409_saying_why(hub, odd, says):
    client, manifest, tokens, store = hub
    assert client.post("/api/v1/devices/b/deltas", content=make_delta(manifest, "b"), headers=H(tokens["b"])).status_code == 201
    r = client.post("/api/v1/devices/a/deltas", content=odd(manifest), headers=H(tokens["a"]))
    assert r.status_code == 409, r.text
    assert says in r.json()["detail"] and "\n" not in r.json()["detail"]
    assert [d.device for d in store.list_deltas("f1")] == ["b"]  # the odd one is not stored


def _upload_after_losing(tmp_path, hub, sql: str):
    """An upload from device a to a fresh hub over the fixture's store after ``sql`` removed a row it needs."""
    client, manifest, tokens, _ = hub
    with sqlite3.connect(tmp_path / "store" / "hub.sqlite3") as db:
        db.execute(sql)
    store = open_store(str(tmp_path / "store"))
    try:
        with TestClient(create_app(store, admin_token=ADMIN, policy_interval_s=0)) as fresh:
            r = fresh.post("/api/v1/devices/a/deltas", content=make_delta(manifest, "a"), headers=H(tokens["a"]))
        return r, store.list_deltas("f1", pending=True)
    finally:
        store.close()


def test_an_upload_to_a_fleet_whose_bundle_is_gone_is_503_naming_the_admins_fix(hub, tmp_path):
    r, stored = _upload_after_losing(tmp_path, hub, "DELETE FROM bundles")
    assert r.status_code == 503 and "edgepeft hub bundle add" in r.json()["detail"]
    assert stored == []


def test_an_upload_from_a_device_whose_fleet_is_gone_is_503_naming_the_admins_fix(hub, tmp_path):
    r, stored = _upload_after_losing(tmp_path, hub, "DELETE FROM fleets WHERE name = 'f1'")
    assert r.status_code == 503 and "edgepeft hub fleet create f1 --bundle" in r.json()["detail"]
    assert stored == []
