"""Hostile bundles: every path stays inside the bundle, links are refused, the graphs read only the
fingerprinted weights, and an uploaded tar is streamed and capped. Each test builds its bad bundle."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import onnx
import pytest
from conftest import make_hub_bundle
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper

from edgepeft.errors import BundleError, HubError
from edgepeft.hub.app import create_app
from edgepeft.hub.bundles import MAX_MEMBERS, check_bundle_files, files_from_tar
from edgepeft.hub.backends import open_store
from edgepeft.onnx_refs import external_locations
from edgepeft.runtime.bundle import open_bundle

ADMIN = "admin-token-for-tests-0123456789"


def graph_reading(location: str, length: int = 16) -> bytes:
    """A serialized ONNX model whose one initializer lives in external file ``location``."""
    t = numpy_helper.from_array(np.zeros((length // 4,), np.float32), "w")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [length // 4])], [t])
    return helper.make_model(g).SerializeToString()


def edit_manifest(bundle, **changes):
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(m))


def tar_of(bundle, gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tar:
        for p in sorted(bundle.iterdir()):
            tar.add(p, arcname=p.name)
    return buf.getvalue()


@pytest.fixture
def bundle(tmp_path):
    return make_hub_bundle(tmp_path / "b")


def test_a_genuine_bundle_opens_and_its_files_pass_the_hub_check(bundle):
    (bundle / "model.onnx").write_bytes(graph_reading("weights.bin"))
    assert open_bundle(bundle).manifest.weights == "weights.bin"
    files = {p.name: p.read_bytes() for p in bundle.iterdir()}
    assert json.loads(check_bundle_files(files))["weights"] == "weights.bin"


def test_external_data_locations_are_found_in_subgraphs_and_constants():
    sub_t = numpy_helper.from_array(np.zeros(3, np.float32), "c")
    sub_t.data_location = TensorProto.EXTERNAL
    sub_t.external_data.add(key="location", value="../hidden.bin")
    sub = helper.make_graph([helper.make_node("Constant", [], ["y"], value=sub_t)], "s", [],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    g = helper.make_graph([helper.make_node("If", ["c0"], ["y"], then_branch=sub, else_branch=sub)], "g",
                          [helper.make_tensor_value_info("c0", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    assert external_locations(helper.make_model(g).SerializeToString()) == {"../hidden.bin"}
    assert external_locations(onnx.load_from_string(graph_reading("weights.bin")).SerializeToString()) == {"weights.bin"}


@pytest.mark.parametrize("key,value", [("weights", "../outside.bin"), ("weights", "/etc/passwd"), ("tokenizer", "sub/tok.json"),
                                       ("weights", ".hidden"), ("graphs", {"infer": {"file": "../m.onnx", "inputs": [], "outputs": []}})])
def test_a_manifest_path_that_leaves_the_bundle_is_refused(bundle, key, value):
    edit_manifest(bundle, **{key: value})
    with pytest.raises(BundleError, match="plain file name inside the bundle"):
        open_bundle(bundle)


def test_a_weights_file_that_is_a_link_is_refused_even_to_the_right_bytes(bundle, tmp_path):
    real = tmp_path / "elsewhere.bin"
    real.write_bytes((bundle / "weights.bin").read_bytes())
    (bundle / "weights.bin").unlink()
    os.symlink(real, bundle / "weights.bin")
    with pytest.raises(BundleError, match="is a link"):
        open_bundle(bundle, verify=False)


def test_a_manifest_that_is_a_link_is_refused(bundle, tmp_path):
    (tmp_path / "m.json").write_bytes((bundle / "manifest.json").read_bytes())
    (bundle / "manifest.json").unlink()
    os.symlink(tmp_path / "m.json", bundle / "manifest.json")
    with pytest.raises(BundleError, match="a link"):
        open_bundle(bundle)


def tampered(bundle):
    """The manifest names a genuine weights file (fingerprint matches); the graph reads another, tampered one."""
    (bundle / "genuine.bin").write_bytes((bundle / "weights.bin").read_bytes())
    (bundle / "weights.bin").write_bytes(b"\x00" * 1024)
    (bundle / "model.onnx").write_bytes(graph_reading("weights.bin"))
    edit_manifest(bundle, weights="genuine.bin")
    return bundle


def test_a_graph_reading_other_weights_than_the_fingerprinted_ones_is_refused_on_the_device(bundle):
    with pytest.raises(BundleError, match="reads external data from 'weights.bin', not the fingerprinted 'genuine.bin'"):
        open_bundle(tampered(bundle))


@pytest.fixture
def hub(tmp_path):
    store = open_store(str(tmp_path / "store"))
    app = create_app(store, admin_token=ADMIN, max_bundle_bytes=1 << 20, policy_interval_s=0)
    with TestClient(app) as client:
        yield client
    store.close()


def upload(client, body: bytes):
    return client.post("/api/v1/bundles", content=body, headers={"Authorization": f"Bearer {ADMIN}"})


def test_the_hub_refuses_a_bundle_whose_graph_reads_a_tampered_file(hub, bundle):
    r = upload(hub, tar_of(tampered(bundle), gz=True))
    assert r.status_code == 422 and "not the fingerprinted 'genuine.bin'" in r.json()["detail"]
    assert hub.get("/api/v1/bundles", headers={"Authorization": f"Bearer {ADMIN}"}).json() == []


def test_the_hub_refuses_links_and_nested_names_in_the_tar(hub, bundle):
    for make in (lambda t: setattr(t, "type", tarfile.SYMTYPE) or setattr(t, "linkname", "/etc/passwd"),
                 lambda t: setattr(t, "name", "../escape.bin")):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("weights.bin")
            make(info)
            tar.addfile(info, io.BytesIO(b""))
        r = upload(hub, buf.getvalue())
        assert r.status_code == 422 and ("not a regular file" in r.text or "unsafe" in r.text)


def gzip_bomb(member: tarfile.TarInfo, size: int) -> bytes:
    """gzip of a tar whose member is ``size`` zero bytes: a few KB on the wire."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
        member.size = size
        gz.write(member.tobuf(format=tarfile.PAX_FORMAT))
        for _ in range(size // (1 << 20)):
            gz.write(bytes(1 << 20))
    return buf.getvalue()


def test_a_gzip_tar_bomb_is_refused_by_its_declared_size_without_expanding_it(hub):
    body = gzip_bomb(tarfile.TarInfo("weights.bin"), 64 << 20)
    assert len(body) < 200_000
    r = upload(hub, body)
    assert r.status_code == 422 and "declares 67108864 bytes; the bundle limit is 1048576" in r.text


def test_a_tar_that_expands_past_the_limit_in_headers_is_refused_at_the_limit():
    # a PAX header is read whole by tarfile before any member is seen; the capped stream stops it
    pax = tarfile.TarInfo("x")
    pax.type = tarfile.XHDTYPE
    body = gzip_bomb(pax, 8 << 20)
    with pytest.raises(HubError, match="expands past the 1048576-byte limit"):
        files_from_tar(io.BytesIO(body), 1 << 20)


def test_a_tar_of_too_many_members_is_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(MAX_MEMBERS + 1):
            tar.addfile(tarfile.TarInfo(f"f{i}"), io.BytesIO(b""))
    buf.seek(0)
    with pytest.raises(HubError, match="more than"):
        files_from_tar(buf, 1 << 20)


def test_a_genuine_bundle_uploads_as_tar_gz(hub, bundle):
    r = upload(hub, tar_of(bundle, gz=True))
    assert r.status_code == 201
    assert r.json()["fingerprint"] == hashlib.sha256((bundle / "weights.bin").read_bytes()).hexdigest()
