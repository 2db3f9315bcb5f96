"""Schemathesis against the hub's own OpenAPI description: no request it generates, sent with the admin
token or a device token, is answered 500. Bounded (a few examples per operation): seconds in all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from test_hub_api import ADMIN, H, hub  # noqa: F401  (the hub fixture)

from conftest import make_hub_bundle
from hypothesis import strategies as st
from test_fuzz_readers import mutated

from edgepeft.delta.transport import pack
from edgepeft.hub.aggregate import parse_delta
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store

EXAMPLES = int(os.environ.get("EDGEPEFT_FUZZ_EXAMPLES", "12"))  # per operation; raise it to dig deeper


def _operations() -> list[tuple[str, str]]:
    """(method, path) of every operation in the hub's OpenAPI description."""
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(store, admin_token=ADMIN, policy_interval_s=0))
        ops = [(r.ok().method.upper(), r.ok().path) for r in schema.get_all_operations()]
        store.close()
    return ops


def _valid(manifest_path):
    from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta
    from edgepeft.manifest import read_manifest

    m = read_manifest(manifest_path)
    d = replace_meta(delta_from_init(m, 0), creator="a", samples=7)
    return delta_bytes(d), pack(d)


OPERATIONS = _operations()
with tempfile.TemporaryDirectory() as _tmp:
    RAW, PACKED = _valid(make_hub_bundle(Path(_tmp) / "b"))  # the same bundle as the hub fixture's


def test_the_description_lists_every_route_fuzzed_here():
    assert ("POST", "/api/v1/devices/{device_id}/deltas") in OPERATIONS and ("DELETE", "/api/v1/fleets/{fleet}/devices/{device}/token") in OPERATIONS


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_request_the_schema_allows_is_answered_500(hub, method, path):
    client, manifest, tokens, store = hub
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    op = next(r.ok() for r in schema.get_all_operations() if (r.ok().method.upper(), r.ok().path) == (method, path))

    statuses: list[int] = []

    @given(case=op.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def fuzz(case):
        for token in (ADMIN, tokens["a"]):
            response = case.call(headers=H(token))
            statuses.append(response.status_code)
            assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"

    fuzz()
    print(f"FUZZED {method} {path}: {len(statuses)} requests, statuses {sorted(set(statuses))}")  # seen with -s


@given(data=st.one_of(mutated(RAW), mutated(PACKED)))
@settings(max_examples=EXAMPLES * 5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_mangled_delta_upload_is_answered_500_or_stored_unchecked(hub, data):
    client, manifest, tokens, store = hub
    r = client.post("/api/v1/devices/a/deltas", content=data, headers=H(tokens["a"]))
    assert r.status_code in (200, 201, 400, 409, 413, 422), r.text[:300]
    for d in store.list_deltas("f1"):  # whatever was stored passes the reader the aggregation uses
        parse_delta(store.get_blob(d.id), "stored", manifest)

