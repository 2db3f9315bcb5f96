"""Sample weights: no device's claim decides the aggregate, sums stay in range, and whatever the hub
publishes passes the device's own delta reader (a property, checked with Hypothesis)."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hub_api import ADMIN, H, hub, make_delta  # noqa: F401  (the hub fixture)

from edgepeft.delta.format import delta_bytes, delta_from_bytes, delta_from_init, replace_meta
from edgepeft.hub import aggregate as agg
from edgepeft.hub import limits
from edgepeft.errors import HubError
from edgepeft.hub.backends import open_store
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import read_manifest


def upload_round(client, tokens, manifest, claims: dict[str, int]) -> list[int]:
    codes = []
    for i, (dev, samples) in enumerate(claims.items()):
        data = make_delta(manifest, dev, seed=i, samples=samples)
        codes.append(client.post(f"/api/v1/devices/{dev}/deltas", content=data, headers=H(tokens[dev])).status_code)
    return codes


def test_a_device_claiming_a_billion_samples_weighs_at_most_the_default_cap(hub):
    client, manifest, tokens, store = hub
    assert upload_round(client, tokens, manifest, {"a": 100, "b": 10**9}) == [201, 201]
    v = client.post("/api/v1/fleets/f1/adapters/default/aggregate", headers=H(ADMIN)).json()
    # median claim (100 + 10^9) / 2 is large, so the absolute default cap (10 000) binds: 100 + 10 000
    assert v["report"]["total_weight"] == 100 + limits.DEFAULT_MAX_SAMPLES
    assert v["report"]["samples"] == 100 + limits.DEFAULT_MAX_SAMPLES


def test_the_median_cap_binds_in_a_fleet_of_small_claims():
    assert limits.sample_weights([100, 100, 100, 10**9], None) == [100, 100, 100, 100]  # no more than the median claim
    assert limits.sample_weights([100, 10**9], 10**9) == [100, 10**9]  # the admin's override replaces the default
    assert limits.sample_weights([5], None) == [5]


def test_the_admin_override_lets_a_large_claim_count(hub):
    client, manifest, tokens, store = hub
    upload_round(client, tokens, manifest, {"a": 100, "b": 50_000})
    v = client.post("/api/v1/fleets/f1/adapters/default/aggregate", json={"max_samples": 10**6}, headers=H(ADMIN)).json()
    assert v["report"]["total_weight"] == 50_100


def test_a_claim_beyond_a_billion_or_a_huge_value_is_refused_at_upload(hub):
    client, manifest, tokens, store = hub
    r = client.post("/api/v1/devices/a/deltas", content=make_delta(manifest, "a", samples=10**9 + 1), headers=H(tokens["a"]))
    assert r.status_code == 422 and "samples=1000000001" in r.text
    d = delta_from_init(manifest, 0)
    d.tensors["head.weight"][0, 0] = 3e38
    data = delta_bytes(replace_meta(d, creator="a", samples=5))
    r = client.post("/api/v1/devices/a/deltas", content=data, headers=H(tokens["a"]))
    assert r.status_code == 422 and "magnitude" in r.text


magnitudes = st.floats(min_value=-limits.MAX_ABS_VALUE, max_value=limits.MAX_ABS_VALUE, allow_nan=False, width=32)


@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(claims=st.lists(st.integers(1, limits.MAX_SAMPLES_CLAIM), min_size=1, max_size=5), scale=magnitudes,
       trim=st.sampled_from([None, 0.2]), clip=st.sampled_from([None, 1e-3, 10.0]),
       max_samples=st.one_of(st.none(), st.integers(1, limits.MAX_SAMPLES_CLAIM)))
def test_everything_the_hub_publishes_passes_the_device_reader(hub_bundle, claims, scale, trim, clip, max_samples):
    manifest = read_manifest(hub_bundle)
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
        rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
        store.create_fleet("f", rec.fingerprint)
        for i, samples in enumerate(claims):
            d = delta_from_init(manifest, i)
            for t in d.tensors.values():
                t[...] = np.clip(t * np.float32(scale), -limits.MAX_ABS_VALUE, limits.MAX_ABS_VALUE)
            data = delta_bytes(replace_meta(d, creator=f"d{i}", samples=samples))
            store.add_delta(DeltaRec(sha256_hex(data), "f", f"d{i}", "default", 0, samples, len(data), float(i)), data)
        options = {k: v for k, v in {"trim": trim, "clip_norm": clip, "max_samples": max_samples}.items() if v is not None}
        v = agg.aggregate(store, "f", "default", options)
        published = store.get_blob(v.sha256)
        store.close()
    back = delta_from_bytes(published, "published", manifest, for_training=True)  # what a device runs on pull
    assert 1 <= back.meta.samples <= len(claims) * limits.DEFAULT_MAX_SAMPLES or max_samples is not None
    assert back.meta.samples <= limits.MAX_PUBLISHED_SAMPLES


def test_a_version_the_reader_would_refuse_is_not_published(hub_bundle, tmp_path, monkeypatch):
    manifest = read_manifest(hub_bundle)
    store = open_store(str(tmp_path))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    store.create_fleet("f", rec.fingerprint)
    data = delta_bytes(replace_meta(delta_from_init(manifest, 0), creator="d", samples=3))
    store.add_delta(DeltaRec(sha256_hex(data), "f", "d", "default", 0, 3, len(data), 0.0), data)
    monkeypatch.setattr(agg, "delta_bytes", lambda d: data[:-4])  # a writer bug: truncated bytes
    with pytest.raises(HubError, match="refusing to publish f/default v1"):
        agg.aggregate(store, "f")
    assert store.latest_version("f", "default") is None
    store.close()
