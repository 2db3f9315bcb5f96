"""bench_hub's upload runs, at a toy size: the benchmark that README's hub figures come from keeps working."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bench_hub  # noqa: E402


def test_every_upload_to_a_real_hub_is_accepted_and_timed(tmp_path):
    r = bench_hub.bench_uploads(None, devices=4, per_device=2, work=tmp_path, procs=2)
    assert (r["uploads"], r["accepted"], r["hub_processes"]) == (8, 8, 1)
    assert r["cpu_ms_per_upload"]["hubs"] > 0 and r["latency_ms"]["p50"] > 0


def test_the_http_ceiling_answers_every_upload(tmp_path):
    r = bench_hub.bench_ceiling(devices=4, per_device=2, work=tmp_path, procs=2)
    assert (r["uploads"], r["accepted"]) == (8, 8)


def test_two_hub_processes_share_one_postgresql_store(tmp_path, postgres_dsn):
    schema = "t" + uuid.uuid4().hex[:12]  # a schema of its own on the shared test server
    r = bench_hub.bench_uploads(f"{postgres_dsn}?schema={schema}", devices=4, per_device=2, work=tmp_path, procs=2, hubs=2)
    assert (r["uploads"], r["accepted"], r["hub_processes"]) == (8, 8, 2)


def test_a_hub_with_two_workers_on_one_sqlite_store_is_timed_over_both(tmp_path):
    r = bench_hub.bench_uploads(None, devices=4, per_device=2, work=tmp_path, procs=2, workers=2)
    assert (r["uploads"], r["accepted"], r["workers_per_hub"]) == (8, 8, 2) and r["cpu_ms_per_upload"]["hubs"] > 0
