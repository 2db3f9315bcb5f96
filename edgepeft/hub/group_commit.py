"""Group commit: concurrent writes share one transaction, so one fsync makes a whole batch durable.

SQLite in WAL mode with ``synchronous=FULL`` fsyncs its log at every commit, and commits are serialized:
uploads committed one by one queue behind that fsync (about 110 a second on this project's disk, which
is what bounded the hub). Here one committer thread takes every write queued meanwhile, runs them in one
transaction (a write that fails is undone alone and its error goes to its own caller: the batch is run again
with a SAVEPOINT around each write), commits once, and only then answers each caller. An acknowledged write
is exactly as durable as before; it just shares its fsync with the writes that arrived while the
previous one ran.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from typing import Any, Callable


class _Rerun(Exception):
    """A write failed in a batch run without savepoints: roll the transaction back and run the batch again, isolated."""


Job = Callable[[Any], Any]  # runs inside the shared transaction with its cursor; its return value goes to its caller


class GroupCommit:
    """Run write jobs in shared transactions opened by ``tx(write=True)`` (a context manager yielding a cursor).

    One committer thread (started on the first write) takes every job queued while the previous commit ran. Callers
    either wait (``run``) or get a future (``submit``): a request thread that hands its write over and returns is free
    to check the next upload during the fsync, so a batch holds every upload that arrived meanwhile, not only as many
    as there are request threads waiting in it.
    """

    def __init__(self, tx: Callable[..., contextlib.AbstractContextManager[Any]], max_batch: int = 256) -> None:
        self._tx, self.max_batch = tx, max_batch
        self._cond = threading.Condition()
        self._queue: list[tuple[Job, Future]] = []
        self._thread: threading.Thread | None = None
        self._closing = False

    def submit(self, job: Job) -> Future:
        """A future of ``job(cursor)``'s result (or exception), set once the commit holding it is durable."""
        future: Future = Future()
        with self._cond:
            self._queue.append((job, future))
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._commit_loop, name="edgepeft-group-commit", daemon=True)
                self._thread.start()
            self._cond.notify()
        return future

    def run(self, job: Job) -> Any:
        """``job(cursor)`` committed durably (alone or with others); its result, or its exception raised here."""
        return self.submit(job).result()

    def close(self) -> None:
        """Commit what is queued, then stop the committer thread (a later write starts another)."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _commit_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:  # closing, and nothing left to commit
                    self._thread = None
                    return
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            self._commit(batch)

    def _commit(self, batch: list[tuple[Job, Future]]) -> None:
        try:
            try:
                results = self._transaction(batch, isolated=False)
            except _Rerun as e:  # a write failed in a batch run without savepoints: all of it was rolled back
                results = [(None, e.__cause__)] if len(batch) == 1 else self._transaction(batch, isolated=True)
        except BaseException as e:  # the commit itself failed: nothing of the batch is durable, every caller hears it
            results = [(None, e)] * len(batch)
        for (_, future), (value, error) in zip(batch, results):
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)

    def _transaction(self, batch: list[tuple[Job, Future]], isolated: bool) -> list[tuple[Any, BaseException | None]]:
        """Run the batch in one transaction. Not ``isolated``: the jobs run back to back and a failing one rolls the whole
        transaction back (``_Rerun``; alone in its batch, its error goes to its caller). ``isolated``: each job in
        its own SAVEPOINT, a failing one undone alone. Writes rarely fail, and a savepoint costs two statements (two
        round trips to PostgreSQL, in the one thread every write of this process waits on), so batches run without
        them first and a failure pays for the batch twice."""
        results: list[tuple[Any, BaseException | None]] = []
        with self._tx(write=True) as cur:
            for i, (job, _) in enumerate(batch):
                if not isolated:
                    try:
                        results.append((job(cur), None))
                    except Exception as e:
                        raise _Rerun from e
                    continue
                cur.execute(f"SAVEPOINT w{i}")
                try:
                    results.append((job(cur), None))
                except Exception as e:  # this write alone is undone; the batch goes on
                    cur.execute(f"ROLLBACK TO w{i}")
                    results.append((None, e))
                cur.execute(f"RELEASE w{i}")
        return results
