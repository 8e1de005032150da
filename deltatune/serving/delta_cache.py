"""Which deltas a server keeps loaded: `--max-loaded-deltas N`, least recently used evicted first.

A server that loads deltas over HTTP (`--allow-loading`) would otherwise grow with every delta ever asked for. As
vLLM's LoRA manager (an LRU cache of `--max-loras` adapters, vllm/lora/models.py), it keeps at most N: loading one
more first unloads the least recently used delta that no request is using (running, prefilling or waiting); the
deltas given with `--delta` at start are pinned, never unloaded. An evicted delta is remembered with the folder it
was loaded from, and a request naming it loads it again (`ModelWorker.ensure_loaded`), checked under --delta-root
again. This module is the bookkeeping alone; the worker thread unloads and loads (`serving/worker.py`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable


class DeltaCache:
    """The order of use of the loaded deltas, the pinned ones and the folders of the evicted ones."""

    def __init__(self, bound: int = 0):
        self.bound = bound  # 0: no bound
        self.pinned: set[str] = set()
        self.evicted: dict[str, str] = {}  # name -> the folder it was loaded from
        self._order: collections.OrderedDict[str, None] = collections.OrderedDict()  # least recently used first
        self._lock = threading.Lock()  # the HTTP threads mark uses, the worker thread loads and evicts

    def used(self, name: str) -> None:
        with self._lock:
            if name in self._order:
                self._order.move_to_end(name)

    def loaded(self, name: str) -> None:
        with self._lock:
            self._order[name] = None
            self._order.move_to_end(name)
            self.evicted.pop(name, None)

    def keep_only(self, loaded: Iterable[str]) -> None:
        """Forget the order of deltas no longer loaded (removed or evicted)."""
        names = set(loaded)
        with self._lock:
            for name in [name for name in self._order if name not in names]:
                del self._order[name]

    def full(self) -> bool:
        return bool(self.bound) and len(self._order) >= self.bound

    def victim(self, busy: set[str]) -> str | None:
        """The least recently used delta that is neither pinned nor `busy` (None: every one is)."""
        with self._lock:
            return next((name for name in self._order if name not in self.pinned and name not in busy), None)
