"""The thread that alone runs a served model: its lifecycle, its control channel and its deltas.

Both servers keep the model on one worker thread, so a forward pass never sees the model change under it: the
classification engine (`deltatune.serving.classify.ClassificationEngine`, batches of /v1/predict requests) and the
generation decode loop (`deltatune.serving.decode_loop.DecodeLoop`, continuous batching). What they share lives here:
starting and closing the thread, running control calls (loading or removing a delta) between two passes, refusing a
delta whose rows cannot share a pass with other tasks, the snapshot of loaded tasks the HTTP threads read, and handing
freed memory back to the operating system. Each subclass writes its own loop (`_run`) and task entry (`_task_entry`).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from deltatune.core.memory import release_free_memory
from deltatune.delta import DeltaModel
from deltatune.errors import DeltaError, Overloaded, ShuttingDown, UnknownTaskError
from deltatune.methods.registry import method_entry, methods_that
from deltatune.serving.config import ServeConfig, delta_under_root, shown_path
from deltatune.serving.delta_cache import DeltaCache
from deltatune.serving.metrics import ServerMetrics

# A server runs forward passes of ever new shapes. glibc then keeps freed tensor memory in its heap (it raises its
# mmap threshold as large blocks are freed), and the resident set creeps up by ~100 MiB per few thousand requests.
# Handing free pages back (malloc_trim) at most every TRIM_EVERY_S seconds keeps it flat for ~2% CPU; making every
# large block an mmap (mallopt M_MMAP_THRESHOLD) also keeps it flat, but cost 60% more CPU here (page faults).
TRIM_EVERY_S = 0.5


async def reload_if_evicted(engine: ModelWorker, name: str) -> None:
    """Before a request for `name` is queued: load it again if the delta cache evicted it (`DeltaCache`)."""
    future = engine.ensure_loaded(name)
    if future is not None:
        await asyncio.wrap_future(future)


class ModelWorker:
    """One DeltaModel, its tokenizer and the worker thread that alone runs the model (subclasses: `_run`)."""

    thread_name = "deltatune-model-worker"
    mixes = "mixable"  # the MethodEntry flag a delta's method needs to be served here (registry.py)
    mixes_phrase = "share a batch with other tasks"  # what its rows could not do otherwise

    def __init__(self, model: DeltaModel, tokenizer, config: ServeConfig, stat_keys: tuple[str, ...]):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self._condition = threading.Condition()
        self._control: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self._closing = False
        # all keys now: readers never see it grow
        self.stats = collections.Counter(dict.fromkeys((*stat_keys, "evicted", "reloaded"), 0))
        self.cache = DeltaCache(config.max_loaded_deltas)  # --max-loaded-deltas: LRU eviction (delta_cache.py)
        self.prometheus = ServerMetrics(self.load_state)  # GET /metrics
        self._tasks: dict[str, dict[str, Any]] = {}  # a snapshot for the HTTP threads; replaced, never mutated
        self._refresh_tasks()
        self._workers = self._threads()
        self._trimmed = time.monotonic()

    def _threads(self) -> list[threading.Thread]:
        """The threads that run the model (one here; the decode loop may run several, `DecodeLoop._threads`)."""
        return [threading.Thread(target=self._run, name=self.thread_name, daemon=True)]

    # ---- any thread ------------------------------------------------------------------------------------
    def start(self):
        for worker in self._workers:
            worker.start()
        return self

    def close(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify_all()
        for worker in self._workers:
            if worker.is_alive():
                worker.join(timeout=30)

    def _admit(self, waiting: int) -> None:
        """Refuse a new request while the server closes or `waiting` requests fill the queue; call it holding
        `self._condition`. Raises ShuttingDown, Overloaded."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if waiting >= self.config.queue_size:
            self.stats["rejected"] += 1
            raise Overloaded(f"{waiting} requests are waiting already (--queue-size); retry shortly")

    @property
    def alive(self) -> bool:
        return all(worker.is_alive() for worker in self._workers)

    @property
    def tasks(self) -> dict[str, dict[str, Any]]:
        """The tasks loaded now ({name: entry}, entries from `_task_entry`); a snapshot, replaced, never mutated."""
        return self._tasks

    def load_state(self) -> dict[str, Any]:
        """What the server holds now, for /metrics: queue_depth, running_requests, running_tasks and waiting_tasks
        (the task of each), loaded_deltas, max_loaded_deltas (0: unbounded) and max_lora (`serving/metrics.py`)."""
        running, waiting = self._running_and_waiting()
        bound = self.config.max_loaded_deltas
        return {"queue_depth": len(waiting), "running_requests": len(running), "running_tasks": running,
                "waiting_tasks": waiting, "loaded_deltas": len(self._tasks), "max_loaded_deltas": bound,
                "max_lora": bound or self.config.max_batch_size}

    def _running_and_waiting(self) -> tuple[list[str], list[str]]:
        """The task of every request running now and of every one waiting (each subclass its own queues)."""
        raise NotImplementedError

    def call(self, function: Callable[[], Any]) -> Future:
        """Run `function()` on the worker thread between two passes (the model's owner); its result in a future."""
        future: Future = Future()
        with self._condition:
            self._control.append((function, future))
            self._condition.notify_all()
        return future

    def load(self, name: str | None, path: str | Path) -> Future:
        return self.call(lambda: self._load(name, path))

    def remove(self, name: str) -> Future:
        return self.call(lambda: self._remove(name))

    def ensure_loaded(self, name: str) -> Future | None:
        """A delta the cache evicted is loaded again, on the worker thread (its future; None: nothing to do)."""
        if name in self._tasks or name not in self.cache.evicted:
            return None
        return self.call(lambda: self._reload(name))

    def forget(self, name: str) -> bool:
        """An evicted delta is not loaded again when next requested (DELETE / unload of an evicted one)."""
        return self.cache.evicted.pop(name, None) is not None

    # ---- on the worker thread (or before it starts) -------------------------------------------------------
    def _run(self) -> None:
        raise NotImplementedError

    def _task_entry(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        """What /v1/tasks or /v1/models shows of one loaded task."""
        raise NotImplementedError

    def _refusal(self, task: str, method: str, path: str | Path) -> str | None:
        """Why this loaded delta cannot be served here (None: it can): its rows must share a pass with others, as
        its method's registry entry says (`mixes`)."""
        if getattr(method_entry(method), self.mixes):
            return None
        return (f"{path} is a {method} delta, whose rows cannot {self.mixes_phrase}; serve a delta of one of "
                f"{methods_that(self.mixes)} (or merge it into its own model and serve that)")

    def _load(self, name: str | None, path: str | Path) -> dict[str, Any]:
        if name not in self.model.task_info:
            self._make_room()
        try:
            task = self.model.add_delta(path, task=name, trust_pickle=self.config.trust_pickle)
        except OSError as error:  # unreadable (permissions, a name the file system refuses): the request's fault
            problem = error.strerror or error
            raise DeltaError(f"delta folder {shown_path(str(path))} cannot be read: {problem}") from None
        refusal = self._refusal(task, self.model.task_info[task]["method"], path)
        if refusal:
            self.model.remove_task(task)
            raise DeltaError(refusal)
        self.model.task_info[task]["path"] = str(path)
        self.cache.loaded(task)
        self._refresh_tasks()
        return {"name": task, **self._tasks[task]}

    def _make_room(self) -> None:
        """At --max-loaded-deltas, unload the least recently used delta no request is using (not a pinned one)."""
        if not self.cache.full():
            return
        running, waiting = self._running_and_waiting()
        victim = self.cache.victim(set(running) | set(waiting))
        if victim is None:
            raise Overloaded(f"all {self.cache.bound} loaded deltas (--max-loaded-deltas) are pinned (--delta) or "
                             f"serving requests; retry shortly")
        path = self.model.task_info[victim]["path"]
        self._remove(victim)
        self.cache.evicted[victim] = path
        self.stats["evicted"] += 1

    def _reload(self, name: str) -> None:
        if name in self.model.task_info:  # another request loaded it first
            return
        path = self.cache.evicted.get(name)
        if path is None:
            raise UnknownTaskError(f"unknown model {name!r}: it was unloaded")
        self._load(name, delta_under_root(self.config.delta_root, path))  # still under the root, symlinks followed
        self.stats["reloaded"] += 1

    def _remove(self, name: str) -> None:
        self.model.remove_task(name)
        self._refresh_tasks()

    def _refresh_tasks(self) -> None:
        self._tasks = {name: self._task_entry(name, info) for name, info in self.model.task_info.items()}
        self.cache.keep_only(self._tasks)

    @staticmethod
    def _run_control(function: Callable[[], Any], future: Future) -> None:
        try:
            future.set_result(function())
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            future.set_exception(error)

    def _release_memory(self) -> None:
        """Hand freed heap pages back to the OS, at most every TRIM_EVERY_S seconds."""
        if time.monotonic() - self._trimmed > TRIM_EVERY_S:
            release_free_memory()
            self._trimmed = time.monotonic()
