"""The status page, opened in headless Chromium (Debian's chromium): fleets, devices, versions, chart."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from conftest import HubThread
from edgepeft.delta.format import delta_bytes, delta_from_init, replace_meta
from edgepeft.hub import aggregate as agg
from edgepeft.hub.app import create_app
from edgepeft.hub.backends import open_store
from edgepeft.hub.store import DeltaRec, sha256_hex
from edgepeft.manifest import read_manifest

ADMIN = "status-admin-token-0123456789"


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("the status page test needs Debian's chromium: apt-get install -y chromium", pytrace=False)


def dump_dom(url: str, profile) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--dump-dom", url]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_status_page_in_headless_chromium(tmp_path, hub_bundle):
    store = open_store(str(tmp_path / "store"))
    files = {p.name: p.read_bytes() for p in hub_bundle.iterdir()}
    rec, _ = store.add_bundle(files["manifest.json"].decode(), files)
    manifest = read_manifest(hub_bundle)
    for fleet, devices in {"orchard": ["pi-north", "pi-south"], "vineyard": ["cam-7"]}.items():
        store.create_fleet(fleet, rec.fingerprint)
        for d in devices:
            store.add_device(fleet, d)
            store.touch_device(d)
    for i, dev in enumerate(["pi-north", "pi-south"]):
        d = delta_from_init(manifest, i)
        d.tensors["head.weight"] += np.float32(i)
        data = delta_bytes(replace_meta(d, creator=dev, samples=10 + i))
        store.add_delta(DeltaRec(sha256_hex(data), "orchard", dev, "default", 0, 10 + i, len(data), 1.0), data)
        store.add_metrics("orchard", dev, {"accuracy": 0.5 + 0.1 * i, "train_loss": 1.0 - 0.2 * i}, version=0)
    agg.aggregate(store, "orchard")
    store.add_metrics("orchard", "pi-north", {"accuracy": 0.8, "train_loss": 0.4}, version=1)
    # the page as rendered (signing in by form and cookie is tested in test_hostile_tokens.py)
    server = HubThread(create_app(store, admin_token=ADMIN, policy_interval_s=0, status_public=True))
    closed = HubThread(create_app(store, admin_token=ADMIN, policy_interval_s=0))
    try:
        dom = dump_dom(f"{server.url}/", tmp_path / "profile")
        denied = dump_dom(f"{closed.url}/", tmp_path / "profile2")
    finally:
        server.stop()
        closed.stop()
        store.close()
    for text in ("orchard", "vineyard", "pi-north", "pi-south", "cam-7", "v1", "2 delta(s), 21 samples", "published"):
        assert text in dom, text
    assert "never" not in dom.split("Devices")[1].split("Adapter")[0]  # every device was seen
    assert 'data-metric="accuracy"' in dom and 'data-metric="train_loss"' in dom and "<polyline" in dom
    assert "<script" not in dom and "http://" not in dom.replace("http://www.w3.org/2000/svg", "")
    assert "orchard" not in denied and 'action="/login"' in denied  # no credentials: the login form
