"""Accepted device tokens are answered from memory (hub/auth_cache.py), and a revoked or rotated one is still refused
at once: in the process that revoked it by forgetting, in any other process by the accept's own INSERT."""

from __future__ import annotations

import pytest
from test_hub_api import ADMIN, H, hub, make_delta  # noqa: F401  (the hub fixture)

from edgepeft.errors import AuthError
from edgepeft.hub.auth_cache import AuthCache
from edgepeft.hub.backends import open_store
from edgepeft.hub.store import DeltaRec, Device, hash_token, sha256_hex


def _upload(client, device, token, data):
    return client.post(f"/api/v1/devices/{device}/deltas", content=data, headers=H(token))


def test_a_cached_token_revoked_through_the_api_is_refused_on_the_next_upload(hub):
    client, manifest, tokens, store = hub
    assert _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=1)).status_code == 201
    assert store.auth_cache.get(hash_token(tokens["a"])) is not None  # the second upload is answered from memory
    assert client.delete("/api/v1/fleets/f1/devices/a/token", headers=H(ADMIN)).status_code == 200
    assert _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=2)).status_code == 401
    assert len(store.list_deltas("f1")) == 1


def test_a_cached_token_rotated_through_the_api_is_refused_and_the_new_one_accepted(hub):
    client, manifest, tokens, store = hub
    assert _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=1)).status_code == 201
    new = client.post("/api/v1/fleets/f1/devices/a/token", headers=H(ADMIN)).json()["token"]
    assert _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=2)).status_code == 401
    assert _upload(client, "a", new, make_delta(manifest, "a", seed=2)).status_code == 201


def test_a_token_revoked_by_another_hub_process_uploads_nothing_although_this_one_still_caches_it(hub, tmp_path):
    client, manifest, tokens, store = hub
    assert _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=1)).status_code == 201
    other = open_store(str(store.root))  # a second hub process over the same store
    try:
        other.revoke_device("a")
    finally:
        other.close()
    assert store.auth_cache.get(hash_token(tokens["a"])) is not None  # this process has not heard of it
    r = _upload(client, "a", tokens["a"], make_delta(manifest, "a", seed=2))
    assert r.status_code == 401 and "revoked or rotated" in r.json()["detail"]
    assert len(store.list_deltas("f1")) == 1


def test_the_store_refuses_a_delta_whose_token_hash_is_no_longer_the_devices(tmp_path, hub_bundle):
    store = open_store(str(tmp_path / "s"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec = store.add_bundle(files["manifest.json"].decode(), files)[0]
    store.create_fleet("f", rec.fingerprint)
    old = store.add_device("f", "d")
    store.rotate_token("d")
    data = b"some delta bytes"
    row = DeltaRec(sha256_hex(data), "f", "d", "default", 0, 1, len(data), 0.0)
    with pytest.raises(AuthError, match="revoked or rotated"):
        store.add_delta(row, data, token_hash=hash_token(old))
    assert store.list_deltas("f") == []
    store.close()


def test_a_lookup_that_began_before_a_revoke_does_not_refill_the_cache():
    cache = AuthCache()
    device = Device("d", "f", "h", 0.0)
    generation = cache.generation  # a lookup reads the row ...
    cache.forget("d")  # ... the device is revoked meanwhile ...
    cache.put("h", device, generation)  # ... and the lookup's stale answer is not kept
    assert cache.get("h") is None
    cache.put("h", device, cache.generation)
    assert cache.get("h") == device


def test_cached_entries_expire_after_the_ttl():
    cache = AuthCache(ttl_s=0.0)
    cache.put("h", Device("d", "f", "h", 0.0), cache.generation)
    assert cache.get("h") is None
