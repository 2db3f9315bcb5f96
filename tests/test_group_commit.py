"""Group commit (hub/group_commit.py): concurrent writes share a transaction, each answered only after the commit
that holds it, a failing write undone alone; and the SQLite store's uploads go through it."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import pytest

from edgepeft.hub.backends import open_store
from edgepeft.hub.group_commit import GroupCommit
from edgepeft.hub.store import DeltaRec, sha256_hex

WRITERS = 48


class CountingDb:
    """A real SQLite file whose commits are counted (and slowed, as an fsync would, so writers pile up meanwhile)."""

    def __init__(self, path) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("CREATE TABLE t (k INTEGER PRIMARY KEY)")
        self.commits = 0
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def tx(self, write: bool = False):
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            time.sleep(0.02)  # the fsync
            self.conn.execute("COMMIT")
            self.commits += 1

    def keys(self) -> set[int]:
        return {k for (k,) in self.conn.execute("SELECT k FROM t")}


def run_writers(group: GroupCommit, jobs) -> list:
    out: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def one(i: int) -> None:
        start.wait()
        try:
            out[i] = group.run(jobs[i])
        except Exception as e:  # noqa: BLE001 - the test looks at what each caller got
            out[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_writes_all_commit_and_share_few_commits(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")
    jobs = [lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)", (k,)).rowcount for k in range(WRITERS)]
    got = run_writers(GroupCommit(db.tx), jobs)
    assert got == [1] * WRITERS
    assert db.keys() == set(range(WRITERS))
    assert db.commits < WRITERS // 4  # one commit for many writes, not one each


def test_a_failing_write_is_undone_alone_and_its_caller_gets_the_error(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")

    def bad(cur):
        cur.execute("INSERT INTO t (k) VALUES (?)", (1000,))
        raise ValueError("refused")

    jobs = [lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)", (k,)).rowcount for k in range(8)] + [bad]
    got = run_writers(GroupCommit(db.tx), jobs)
    assert isinstance(got[-1], ValueError) and got[:-1] == [1] * 8
    assert db.keys() == set(range(8))


def test_a_failed_commit_reaches_every_writer_of_its_batch(tmp_path):
    @contextlib.contextmanager
    def tx(write: bool = False):
        yield sqlite3.connect(":memory:")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        GroupCommit(tx).run(lambda cur: 1)


def test_sqlite_store_stores_each_of_many_concurrent_uploads_once(tmp_path):
    store = open_store(str(tmp_path / "store"))
    blobs = [f"delta {i}".encode() for i in range(WRITERS)]
    recs = [DeltaRec(sha256_hex(b), "f", f"d{i}", "default", 0, 1, len(b), float(i)) for i, b in enumerate(blobs)]
    results: list = [None] * (2 * WRITERS)
    start = threading.Barrier(2 * WRITERS)

    def one(i: int) -> None:  # every upload twice at once: a retry racing its original
        start.wait()
        results[i] = store.add_delta(recs[i % WRITERS], blobs[i % WRITERS], sha256_hex(b"content" + blobs[i % WRITERS]))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2 * WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == WRITERS
    assert sorted(d.id for d in store.list_deltas("f")) == sorted(r.id for r in recs)
    assert all(store.get_blob(r.id) == b for r, b in zip(recs, blobs))
    store.close()


def test_writes_handed_over_by_one_thread_share_commits_while_it_goes_on(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")
    group = GroupCommit(db.tx)
    futures = [group.submit(lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)", (k,)).rowcount) for k in range(WRITERS)]
    assert [f.result() for f in futures] == [1] * WRITERS  # each answered once its commit is done
    assert db.keys() == set(range(WRITERS))
    assert db.commits < WRITERS // 4  # the thread did not wait through each commit: its writes were batched
    group.close()


def test_close_commits_what_is_queued_and_a_later_write_still_commits(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")
    group = GroupCommit(db.tx)
    futures = [group.submit(lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)", (k,)).rowcount) for k in range(4)]
    group.close()
    assert all(f.done() for f in futures) and db.keys() == set(range(4))
    assert group.run(lambda cur: cur.execute("INSERT INTO t (k) VALUES (99)").rowcount) == 1
    group.close()


def test_a_batch_without_failures_runs_no_savepoints_and_one_with_a_failure_reruns_isolated(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")
    seen: list[str] = []
    db.conn.set_trace_callback(seen.append)
    ok = [lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)", (k,)).rowcount for k in range(8)]
    assert run_writers(GroupCommit(db.tx), ok) == [1] * 8
    assert not any(s.startswith("SAVEPOINT") for s in seen)  # two round trips a write saved where nothing fails

    def bad(cur):
        cur.execute("INSERT INTO t (k) VALUES (?)", (1000,))
        raise ValueError("refused")

    seen.clear()
    gate = threading.Event()

    def first(cur):  # holds the committer in its transaction until every other write is queued
        gate.wait(10)
        return cur.execute("INSERT INTO t (k) VALUES (100)").rowcount

    group = GroupCommit(db.tx)
    # the failing write is queued right behind the first: whichever batch it lands in holds other writes too
    futures = [group.submit(job) for job in [first, bad, *(lambda cur, k=k: cur.execute("INSERT INTO t (k) VALUES (?)",
                                                                                          (k,)).rowcount for k in range(8, 12))]]
    gate.set()
    group.close()
    assert isinstance(futures[1].exception(), ValueError) and [f.result() for f in futures[:1] + futures[2:]] == [1] * 5
    assert db.keys() == {*range(12), 100} and any(s.startswith("SAVEPOINT") for s in seen)


def test_a_lone_failing_write_is_rolled_back_and_its_caller_gets_the_error(tmp_path):
    db = CountingDb(tmp_path / "g.sqlite3")

    def bad(cur):
        cur.execute("INSERT INTO t (k) VALUES (?)", (7,))
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        GroupCommit(db.tx).run(bad)
    assert db.keys() == set()
