"""Many adapters on one base: one inference session, deltas chosen per call by name or mixed with weights.

The base session is built once. Each adapter is a delta file registered under a name; it is read
memory-mapped and checked completely against the bundle (``edgepeft.delta.map_delta``) when added,
then kept in its feed form (``feeds.prepare``: A and bias slots are views of the map, B is scaled
once) in a least-recently-used cache bounded by ``cap_bytes``. Pinned adapters are never evicted; an
evicted one is mapped and checked again on its next use. Switching adapters changes only the feeds
of the next call: no session, graph or weight is rebuilt.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np

from edgepeft.delta.format import map_delta
from edgepeft.errors import DeltaError
from edgepeft.runtime.bundle import Bundle, SessionConfig
from edgepeft.runtime.feeds import PreparedDelta, prepare
from edgepeft.runtime.infer import Prediction, Predictor

DEFAULT_CAP_BYTES = 256 * 1024 * 1024

# None: the base model; "name": one adapter at weight 1; {"a": 0.7, "b": 0.3}: a weighted mix
AdapterSpec = Union[None, str, Mapping[str, float]]


class AdapterError(DeltaError):
    """An adapter name is unknown or taken, a mix is malformed, or the cache cannot hold what is asked."""


@dataclass
class PoolStats:
    """Cache counters since the pool was made."""

    loads: int = 0  # delta files mapped and checked (adds and reloads after eviction)
    hits: int = 0  # uses served from the cache
    evictions: int = 0


class AdapterPool:
    """One bundle's inference session shared by many named adapters."""

    def __init__(self, bundle: Bundle, *, cap_bytes: int = DEFAULT_CAP_BYTES, config: SessionConfig = SessionConfig()) -> None:
        if cap_bytes <= 0:
            raise AdapterError(f"cap_bytes must be positive, got {cap_bytes}")
        self.predictor = Predictor(bundle, config)
        self.manifest = bundle.manifest
        self.cap_bytes = int(cap_bytes)
        self.stats = PoolStats()
        self._paths: dict[str, Path] = {}
        self._cache: OrderedDict[str, PreparedDelta] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()

    # ---- registry -------------------------------------------------------------------------------

    def add(self, name: str, path: str | os.PathLike, *, pin: bool = False) -> None:
        """Register the delta file ``path`` as ``name``, after checking it against the bundle; it is cached now."""
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter name must be a non-empty string, got {name!r}")
        if name in self._paths:
            raise AdapterError(f"adapter {name!r} is already added (from {self._paths[name]}); remove it first")
        p = Path(os.fspath(path))
        entry = self._load(p)
        self._paths[name] = p
        try:
            self._insert(name, entry)
        except AdapterError:
            del self._paths[name]
            raise
        if pin:
            self._pinned.add(name)

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (cached or not, pinned or not)."""
        self._known(name)
        del self._paths[name]
        self._cache.pop(name, None)
        self._pinned.discard(name)

    def pin(self, name: str) -> None:
        """Keep ``name`` cached until unpinned (it is loaded now if it was evicted)."""
        self._known(name)
        if name not in self._cache:
            self._insert(name, self._load(self._paths[name]))
        self._pinned.add(name)

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again."""
        self._known(name)
        self._pinned.discard(name)

    @property
    def names(self) -> list[str]:
        """Every added adapter, in the order added."""
        return list(self._paths)

    @property
    def cached(self) -> list[str]:
        """Cached adapters, least recently used first."""
        return list(self._cache)

    @property
    def pinned(self) -> set[str]:
        return set(self._pinned)

    @property
    def cached_bytes(self) -> int:
        """Bytes of the cached adapters' feed arrays (at most ``cap_bytes``)."""
        return sum(e.nbytes for e in self._cache.values())

    # ---- inference ------------------------------------------------------------------------------

    def resolve(self, adapter: AdapterSpec) -> tuple[list[PreparedDelta], list[float] | None]:
        """The prepared deltas and weights for an adapter spec (None, a name, or {name: weight})."""
        if adapter is None:
            return [], None
        if isinstance(adapter, str):
            return [self._get(adapter)], None
        if not isinstance(adapter, Mapping) or not adapter:
            raise AdapterError(f"adapter must be None, a name or a non-empty {{name: weight}} mapping, got {adapter!r}")
        weights = []
        for name, w in adapter.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise AdapterError(f"mixing weight of adapter {name!r} is {w!r}; expected a finite number")
            weights.append(float(w))
        return [self._get(name) for name in adapter], weights

    def logits(self, ids: np.ndarray, mask: np.ndarray, adapter: AdapterSpec = None) -> np.ndarray:
        """Raw logits of a padded batch with ``adapter`` active (see Predictor.logits)."""
        deltas, weights = self.resolve(adapter)
        return self.predictor.logits(ids, mask, deltas, weights)

    def classify(self, texts: Sequence[str], adapter: AdapterSpec = None, batch_size: int = 32) -> list[Prediction]:
        """Label and probabilities per text with ``adapter`` active."""
        deltas, weights = self.resolve(adapter)
        return self.predictor.classify(texts, deltas, weights, batch_size)

    def generate(self, prompt: str, adapter: AdapterSpec = None, max_new_tokens: int = 20) -> str:
        """Greedy continuation of ``prompt`` with ``adapter`` active."""
        deltas, weights = self.resolve(adapter)
        return self.predictor.generate(prompt, max_new_tokens, deltas, weights)

    # ---- cache ----------------------------------------------------------------------------------

    def _known(self, name: str) -> None:
        if name not in self._paths:
            added = ", ".join(sorted(self._paths)[:8]) or "none"
            raise AdapterError(f"unknown adapter {name!r}; added: {added}")

    def _load(self, path: Path) -> PreparedDelta:
        entry = prepare(self.manifest, map_delta(path, self.manifest))
        self.stats.loads += 1
        return entry

    def _get(self, name: str) -> PreparedDelta:
        self._known(name)
        entry = self._cache.get(name)
        if entry is not None:
            self._cache.move_to_end(name)
            self.stats.hits += 1
            return entry
        entry = self._load(self._paths[name])
        self._insert(name, entry)
        return entry

    def _insert(self, name: str, entry: PreparedDelta) -> None:
        """Cache ``entry``, evicting least recently used unpinned adapters; refuse (evicting nothing) if it cannot fit."""
        need = entry.nbytes
        if need > self.cap_bytes:
            raise AdapterError(f"adapter {name!r} needs {need} bytes, more than the pool's cap_bytes={self.cap_bytes}")
        free = self.cap_bytes - self.cached_bytes
        victims = []
        for other, e in self._cache.items():
            if free >= need:
                break
            if other not in self._pinned and other != name:
                victims.append(other)
                free += e.nbytes
        if free < need:
            held = sum(self._cache[n].nbytes for n in self._pinned if n in self._cache)
            raise AdapterError(f"adapter {name!r} needs {need} bytes but pinned adapters hold {held} of "
                               f"cap_bytes={self.cap_bytes}; unpin some or raise the cap")
        for v in victims:
            del self._cache[v]
            self.stats.evictions += 1
        self._cache[name] = entry
