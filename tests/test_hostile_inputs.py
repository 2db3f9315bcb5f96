"""Malformed input gets a one-line refusal, never a traceback or a 500: API paths and bodies, manifests,
checkpoint state, device config; a hang-up mid-upload is one log line; dedup is by content, not bytes."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi import HTTPException
from starlette.requests import ClientDisconnect
from test_hub_api import ADMIN, H, hub, make_delta  # noqa: F401  (the hub fixture)

from edgepeft.delta.format import delta_from_bytes
from edgepeft.delta.transport import pack
from edgepeft.devices.agent import AgentConfig
from edgepeft.errors import BundleError, HubError, TrainError
from edgepeft.hub.bodies import read_body
from edgepeft.manifest import read_manifest
from edgepeft.runtime import checkpoint as ckpt


def test_the_same_delta_raw_then_packed_is_stored_once(hub):
    client, manifest, tokens, store = hub
    raw = make_delta(manifest, "a", seed=3)
    first = client.post("/api/v1/devices/a/deltas", content=raw, headers=H(tokens["a"]))
    again = client.post("/api/v1/devices/a/deltas", content=pack(delta_from_bytes(raw, "x")), headers=H(tokens["a"]))
    assert first.status_code == 201 and again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert len(store.list_deltas("f1", pending=True)) == 1


def test_a_different_delta_of_the_same_device_is_not_a_duplicate(hub):
    client, manifest, tokens, store = hub
    for seed in (1, 2):
        r = client.post("/api/v1/devices/a/deltas", content=pack(delta_from_bytes(make_delta(manifest, "a", seed=seed), "x")),
                        headers=H(tokens["a"]))
        assert r.status_code == 201
    assert len(store.list_deltas("f1", pending=True)) == 2


@pytest.mark.parametrize("version", ["²", "٣", "9" * 30, "-1", "1e3"])
def test_a_strange_version_in_the_path_is_422(hub, version):
    client, manifest, tokens, store = hub
    r = client.get(f"/api/v1/fleets/f1/adapters/default/versions/{version}", headers=H(tokens["a"]))
    assert r.status_code == 422 and "number or 'latest'" in r.text


@pytest.mark.parametrize("body", [{"values": {"loss": float("nan")}}, {"values": {"loss": 1e300}}, {"values": {"x" * 65: 1.0}},
                                  {"values": {"a/b": 1.0}}, {"values": {"loss": 1.0}, "version": 10**30},
                                  {"values": {f"m{i}": 1.0 for i in range(65)}}, {"values": []}])
def test_a_bad_metrics_body_is_422(hub, body):
    client, manifest, tokens, store = hub
    r = client.post("/api/v1/devices/a/metrics", content=json.dumps(body), headers={**H(tokens["a"]), "Content-Type": "application/json"})
    assert r.status_code == 422


@pytest.mark.parametrize("field,value", [("aggregate_every", 10**30), ("aggregate_minutes", 1e300), ("staleness", -1),
                                         ("name", "x" * 10_000), ("robust", {"clip_norm": "big"}), ("robust", {"trim": [[[]]]})])
def test_a_bad_fleet_body_is_422(hub, field, value):
    client, *_ = hub
    body = {"name": "g", "bundle": "0" * 64, field: value}
    assert client.post("/api/v1/fleets", json=body, headers=H(ADMIN)).status_code == 422


@pytest.mark.parametrize("rng", ["bytes=" + "9" * 5000 + "-", "bytes=٣-", "bytes=5-2", "bytes=-" + "1" * 40])
def test_a_strange_range_header_is_never_a_500(hub, rng):
    client, manifest, tokens, store = hub
    client.post("/api/v1/fleets/f1/adapters/default/versions", content=make_delta(manifest, "hub"), headers=H(ADMIN))
    r = client.get("/api/v1/fleets/f1/adapters/default/versions/1", headers={**H(tokens["a"]), "Range": rng.encode()})
    assert r.status_code in (200, 206, 416)


class HangUp:
    """A request whose client disconnects after one chunk."""

    method, headers = "POST", {}
    url = type("U", (), {"path": "/api/v1/devices/a/deltas"})()

    async def stream(self):
        yield b"x" * 100
        raise ClientDisconnect()


def test_a_client_hanging_up_mid_upload_is_one_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="edgepeft.hub"), pytest.raises(HTTPException) as e:
        asyncio.run(read_body(HangUp(), 1000))
    assert e.value.status_code == 400
    assert [r.getMessage() for r in caplog.records] == ["POST /api/v1/devices/a/deltas: client hung up after 100 body bytes"]
    assert all(r.exc_info is None for r in caplog.records)


@pytest.mark.parametrize("text,why", [
    (b"\xff\xfe{}", "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    (b'{"format": "edgepeft-bundle", "version": 1, "extra": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
    (b'{"format": "edgepeft-bundle", "version": 1, "max_length": NaN}', "NaN is not a JSON number"),
])
def test_a_malformed_manifest_is_one_line(tmp_path, text, why):
    (tmp_path / "manifest.json").write_bytes(text)
    with pytest.raises(BundleError, match=why) as e:
        read_manifest(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,why", [("max_length", "16", "'max_length' must be an integer"),
                                           ("slots", [{"name": "a", "kind": "lora_A", "module": "m", "shape": [True, 2]}], "shape"),
                                           ("vocab_size", 2**40, "'vocab_size' must be an integer in"),
                                           ("labels", "abc", "'labels' must be a list"),
                                           ("fingerprint", "ZZ", "64 lowercase hex")])
def test_a_manifest_field_of_the_wrong_type_or_range_is_named(hub_bundle, tmp_path, key, value, why):
    m = json.loads((hub_bundle / "manifest.json").read_text())
    m[key] = value
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=why):
        read_manifest(tmp_path)


def good_state() -> dict:
    return {"identity": {}, "optimizer": {"step": 3}, "step": 3, "epoch": 0, "position": 12,
            "epoch_rng": {"bit_generator": "PCG64", "state": {"state": 1, "inc": 3}, "has_uint32": 0, "uinteger": 0},
            "samples": 12, "best": None, "bad_evals": 0, "stopped": False, "before": None, "losses": [1.0, float("nan")],
            "last_eval_step": -1, "done": False, "saved": "now"}


@pytest.mark.parametrize("change", [{"step": "3"}, {"step": -1}, {"epoch_rng": {"bit_generator": "MT19937"}},
                                    {"losses": [[1]]}, {"best": {"metrics": {}, "step": 1}}, {"optimizer": {}}])
def test_a_malformed_checkpoint_state_is_one_line(tmp_path, change):
    ckpt.save_checkpoint(tmp_path, {}, good_state())
    assert ckpt.load_checkpoint(tmp_path)[1]["step"] == 3
    ckpt.save_checkpoint(tmp_path, {}, {**good_state(), **change})
    with pytest.raises(TrainError, match="cannot be read") as e:
        ckpt.load_checkpoint(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text,why", [('interval_s = "soon"', "'interval_s' must be a finite number"),
                                      ("retries = 1000", "'retries' must be an integer in 0..100"),
                                      ("hub = 5", "'hub' must be a string"),
                                      ("[train]\na = {b = {c = {d = {e = 1}}}}", "nested deeper"),
                                      ("retries = true", "'retries' must be an integer")])
def test_a_malformed_device_config_is_one_line(tmp_path, text, why):
    (tmp_path / "device.toml").write_text(text)
    with pytest.raises(HubError, match=why) as e:
        AgentConfig.from_toml(tmp_path / "device.toml")
    assert "\n" not in str(e.value)
