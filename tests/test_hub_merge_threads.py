"""``hub serve --merge-threads``: the setting reaches the process that merges, a worker of ``--workers N`` included."""

from __future__ import annotations

import json
import os

from click.testing import CliRunner

from edgepeft.hub import aggregate, workers


def test_a_worker_merges_on_the_threads_serve_was_given(tmp_path, monkeypatch):
    (tmp_path / "admin.token").write_text("t" * 40)
    opts = workers.WorkerOptions(str(tmp_path / "store"), str(tmp_path / "admin.token"), 1 << 20, 0.0, 2, False, merge_threads=1)
    monkeypatch.setenv(workers.ENV, opts.to_env())
    monkeypatch.setattr("edgepeft.hub.local.die_with_parent", lambda: None)  # not this test process
    monkeypatch.setattr(aggregate, "MERGE_THREADS", 7)  # anything but what serve said
    workers.app_from_env()
    assert aggregate.merge_threads() == 1


def test_by_default_a_merge_takes_every_core_it_may_run_on(monkeypatch):
    monkeypatch.setattr(aggregate, "MERGE_THREADS", None)
    assert aggregate.merge_threads() == len(os.sched_getaffinity(0))
    old = json.loads(workers.WorkerOptions("s", "f", 1, 0.0, 2, False).to_env())
    del old["merge_threads"]  # what a hub started before the option passes its workers
    assert workers.WorkerOptions(**old).merge_threads == 0


def test_serve_refuses_a_negative_thread_count():
    from edgepeft.commands.hub import hub_group

    r = CliRunner().invoke(hub_group, ["serve", "--store", "x", "--merge-threads", "-1"])
    assert r.exit_code == 2 and "--merge-threads" in r.output
