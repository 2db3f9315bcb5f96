"""edgepeft/hub/local.py: the hub a demo or benchmark starts on this machine does not outlive its starter."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from edgepeft.hub.local import free_port

STARTER = """
import sys, time
from edgepeft.hub.local import start_hub
hub = start_hub(sys.argv[1], int(sys.argv[2]), sys.argv[3])
print(hub.pid, flush=True)
time.sleep(600)
"""


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_local_hub_stops_when_the_process_that_started_it_is_killed(tmp_path):
    port = free_port()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path / "store"), str(port), str(tmp_path / "hub.log")],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert starter.stdout.readline().strip().isdigit()  # the hub answered /healthz before this line
        assert _answers(port)
        starter.kill()  # SIGKILL: no finally, no atexit in the starter
        starter.wait()
        deadline = time.monotonic() + 30
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _answers(port), "the hub kept serving after the process that started it was killed"
    finally:
        starter.kill()
