"""Group commit: concurrent writes share one transaction, so one fsync makes a whole batch durable.

SQLite in WAL mode with ``synchronous=FULL`` fsyncs its log at every commit, and commits are serialized:
uploads committed one by one queue behind that fsync (about 110 a second on this project's disk, which
is what bounded the hub). Here a writer that finds no batch in flight leads one: it takes every write
queued meanwhile, runs each inside its own SAVEPOINT (a write that fails is rolled back alone and its
error goes to its own caller), commits once, and only then answers each caller. An acknowledged write
is exactly as durable as before; it just shares its fsync with the writes that arrived while the
previous one ran.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

Job = Callable[[Any], Any]  # runs inside the shared transaction with its cursor; its return value goes to its caller


class _Item:
    __slots__ = ("job", "done", "value", "error")

    def __init__(self, job: Job) -> None:
        self.job, self.done, self.value, self.error = job, False, None, None


class GroupCommit:
    """Run write jobs in shared transactions opened by ``tx(write=True)`` (a context manager yielding a cursor)."""

    def __init__(self, tx: Callable[..., contextlib.AbstractContextManager[Any]], max_batch: int = 256) -> None:
        self._tx, self.max_batch = tx, max_batch
        self._cond = threading.Condition()
        self._queue: list[_Item] = []
        self._leading = False

    def run(self, job: Job) -> Any:
        """``job(cursor)`` committed durably (alone or with others); its result, or its exception raised here."""
        item = _Item(job)
        with self._cond:
            self._queue.append(item)
        while True:
            with self._cond:
                while self._leading and not item.done:
                    self._cond.wait()
                if item.done:
                    break
                self._leading = True  # no batch in flight and ours is not done: lead the next one
                batch, self._queue = self._queue[:self.max_batch], self._queue[self.max_batch:]
            try:
                self._commit(batch)
            finally:
                with self._cond:
                    self._leading = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        return item.value

    def _commit(self, batch: list[_Item]) -> None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            with self._tx(write=True) as cur:
                for i, item in enumerate(batch):
                    cur.execute(f"SAVEPOINT w{i}")
                    try:
                        results.append((item.job(cur), None))
                    except Exception as e:  # this write alone is undone; the batch goes on
                        cur.execute(f"ROLLBACK TO w{i}")
                        results.append((None, e))
                    cur.execute(f"RELEASE w{i}")
        except BaseException as e:  # the commit itself failed: nothing of the batch is durable, every caller hears it
            results = [(None, e)] * len(batch)
        for item, (value, error) in zip(batch, results):
            item.value, item.error, item.done = value, error, True
