"""The lean upload path (hub/lean_upload.py) answers every upload exactly as the FastAPI route it stands in for."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from edgepeft.delta.format import delta_from_bytes
from edgepeft.delta.transport import pack
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store
from edgepeft.manifest import read_manifest
from test_hub_api import ADMIN, H, bundle_tar, make_delta

SHOWN_HEADERS = ("content-type", "www-authenticate")


def _bodies(bundle_dir) -> dict[str, bytes]:
    """The deltas the script sends, made once (a delta's meta records when it was made)."""
    manifest = read_manifest(bundle_dir)
    return {"good": make_delta(manifest, "a", seed=1),
            "packed": pack(delta_from_bytes(make_delta(manifest, "a", seed=2), "x")),
            "future parent": make_delta(manifest, "a", parent=5)}


def _answers(root, bundle_dir, bodies: dict[str, bytes], *, lean: bool) -> list[tuple]:
    """(status, body, shown headers) of one scripted series of uploads to a fresh hub, then its OpenAPI entry."""
    store = open_store(str(root))
    try:
        with TestClient(create_app(store, admin_token=ADMIN, max_upload_bytes=64 * 1024, policy_interval_s=0,
                                   lean_upload=lean)) as client:
            fp = client.post("/api/v1/bundles", content=bundle_tar(bundle_dir), headers=H(ADMIN)).json()["fingerprint"]
            client.post("/api/v1/fleets", json={"name": "f1", "bundle": fp, "staleness": 1}, headers=H(ADMIN))
            tokens = {d: client.post("/api/v1/fleets/f1/devices", json={"device": d}, headers=H(ADMIN)).json()["token"]
                      for d in ("a", "b")}
            good = bodies["good"]
            script = [
                ("a", tokens["a"], good),  # 201
                ("a", tokens["a"], good),  # 200, a retry
                ("a", tokens["a"], bodies["packed"]),  # 201, packed
                ("a", None, good),  # 401, no token
                ("a", "a.wrong", good),  # 401
                ("a", ADMIN, good),  # 403, the admin is no device
                ("a", tokens["b"], good),  # 403, another device's token
                ("b", tokens["b"], good),  # 403, another device's bytes
                ("a", tokens["a"], b"\0" * (64 * 1024 + 1)),  # 413
                ("a", tokens["a"], b"not a delta at all"),  # 422
                ("a", tokens["a"], bodies["future parent"]),  # 409, a parent from the future
                ("a%2Fx", tokens["a"], good),  # 404: %2F decodes to a slash, so no route (and no lean match) takes the path
            ]
            out = []
            for device, token, body in script:
                r = client.post(f"/api/v1/devices/{device}/deltas", content=body, headers=H(token) if token else {})
                out.append((r.status_code, r.json(), {k: r.headers.get(k) for k in SHOWN_HEADERS}))
            out.append(client.get("/openapi.json").json()["paths"]["/api/v1/devices/{device_id}/deltas"])
            return out
    finally:
        store.close()


def test_every_upload_is_answered_as_the_fastapi_route_answers_it(tmp_path, hub_bundle):
    bodies = _bodies(hub_bundle)
    lean = _answers(tmp_path / "lean", hub_bundle, bodies, lean=True)
    assert lean == _answers(tmp_path / "route", hub_bundle, bodies, lean=False)
    assert [a[0] for a in lean[:-1]] == [201, 200, 201, 401, 401, 403, 403, 403, 413, 422, 409, 404]


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_other_methods_on_the_upload_path_reach_fastapi(tmp_path, hub_bundle, method):
    store = open_store(str(tmp_path / "store"))
    try:
        with TestClient(create_app(store, admin_token=ADMIN, policy_interval_s=0)) as client:
            assert client.request(method, "/api/v1/devices/a/deltas").status_code == 405
    finally:
        store.close()
