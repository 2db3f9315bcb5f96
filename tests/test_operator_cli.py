"""The commands a fleet operator types, run as processes against a real hub process: hub serve, hub bundle add,
hub fleet create, hub device add / revoke, hub aggregate, agent run, push, pull."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import httpx
import numpy as np

from edgepeft.hub.local import free_port
from edgepeft.delta.format import delta_from_init, load_delta, replace_meta, save_delta
from synthetic_tasks import word_group_rows, write_jsonl

ADMIN = "operator-admin-token-0123456789"


def edgepeft(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``edgepeft ARGS`` in its own process; fails the test unless it exits as ``ok`` says."""
    r = subprocess.run([sys.executable, "-m", "edgepeft.cli", *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "EDGEPEFT_HUB": "", "EDGEPEFT_TOKEN_FILE": ""})
    assert (r.returncode == 0) is ok, (args, r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    return r


def test_operator_commands_end_to_end(bundles, tmp_path):
    bundle = bundles("bert")
    admin_file = tmp_path / "admin.token"
    admin_file.write_text(ADMIN)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "hub.log", "wb")
    hub = subprocess.Popen([sys.executable, "-m", "edgepeft.cli", "hub", "serve", "--store", f"sqlite://{tmp_path / 'hub'}",
                            "--port", str(port), "--admin-token-file", str(admin_file), "--policy-interval", "0",
                            "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert hub.poll() is None and time.time() < deadline, (tmp_path / "hub.log").read_text()[-3000:]
            time.sleep(0.2)
        admin = ("--hub", url, "--admin-token-file", str(admin_file))

        fingerprint = edgepeft("hub", "bundle", "add", str(bundle.path), *admin).stdout.strip()
        assert fingerprint == bundle.manifest.fingerprint
        assert "fleet main created" in edgepeft("hub", "fleet", "create", "main", "--bundle", fingerprint, *admin).stdout
        again = edgepeft("hub", "fleet", "create", "main", "--bundle", fingerprint, *admin, ok=False)
        assert "409" in again.stderr and "exists already" in again.stderr and "Traceback" not in again.stderr
        for dev in ("dev1", "dev2"):
            edgepeft("hub", "device", "add", "main", dev, "-o", str(tmp_path / f"{dev}.token"), *admin)
            assert stat.S_IMODE((tmp_path / f"{dev}.token").stat().st_mode) == 0o600  # a secret: the owner's alone

        # a device runs its agent: downloads nothing (bundle present), trains on its data, pushes packed
        home = tmp_path / "dev1"
        (home / "data").mkdir(parents=True)
        write_jsonl(home / "data" / "a.jsonl", word_group_rows(24, 3))
        (home / "device.toml").write_text(
            f'hub = "{url}"\ntoken_file = "{tmp_path / "dev1.token"}"\nbundle = "{bundle.path}"\n'
            'retries = 2\nbackoff_s = 0.05\n[train]\nepochs = 1\nmax_steps = 2\nbatch_size = 8\nthreads = 1\ncheckpoint_every = 0\n')
        line = edgepeft("agent", "run", "--config", str(home / "device.toml"), "--once").stdout
        assert "trained=1 sent=1 pending=0" in line and "up=0 B" not in line, line

        version = edgepeft("hub", "aggregate", "main", *admin).stdout
        assert "1" in version and "trimmed mean over 1 deltas" in version, version  # the defaults, and what they took

        # another device pulls the version (packed on the wire, its sha256 checked) and pushes its own delta
        device2 = ("--hub", url, "--token-file", str(tmp_path / "dev2.token"))
        pulled = edgepeft("pull", "default", "-o", str(tmp_path / "v1.delta"), *device2).stdout
        assert "main/default v1" in pulled and "sha256 checked" in pulled, pulled
        v1 = load_delta(tmp_path / "v1.delta", bundle.manifest)
        assert v1.meta.version == 1
        mine = delta_from_init(bundle.manifest, 5)
        mine.tensors[sorted(mine.tensors)[0]] += np.float32(0.01)
        save_delta(tmp_path / "mine.delta", replace_meta(mine, creator="dev2", samples=7, parent=1))
        assert "accepted" in edgepeft("push", str(tmp_path / "mine.delta"), *device2).stdout

        # the agent's next round pulls v1
        assert "v1: pulled=yes" in edgepeft("agent", "run", "--config", str(home / "device.toml"), "--once").stdout

        # revoked: the device's next request is refused, in one line
        edgepeft("hub", "device", "revoke", "main", "dev2", *admin)
        refused = edgepeft("pull", "default", "-o", str(tmp_path / "again.delta"), *device2, ok=False)
        assert "401" in refused.stderr and "Traceback" not in refused.stderr and not (tmp_path / "again.delta").exists()
    finally:
        hub.terminate()
        try:
            hub.wait(10)
        except subprocess.TimeoutExpired:
            hub.kill()
        log.close()
