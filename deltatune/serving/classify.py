"""Classification behind `deltatune serve`: `POST /v1/predict` and the engine that batches it ACROSS tasks.

    curl -s localhost:8000/v1/predict -d '{"task": "sst2", "inputs": ["a charming film", "a dull one"]}'

`{"task", "inputs"}` -> a label and probabilities per input (or a score), as `deltatune predict` prints them.

How requests become batches: a request handler only puts a job (task + texts) in a bounded queue and awaits
it. One worker thread owns the model. It takes the oldest job, waits up to `max_wait_ms` after that job
arrived for others (until `max_batch_size` inputs), and runs them all, whatever their tasks, as ONE
mixed-task forward pass: `model(**batch, tasks=[one task per input])`. Loading and removing deltas run on the
same thread, between batches, so the model is never changed under a running pass. When `queue_size`
requests wait already, a new one is answered 429 with Retry-After: memory stays bounded under overload.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Annotated, Any

import torch
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deltatune.core.component import BASE_TASK
from deltatune.delta import DeltaModel
from deltatune.errors import UnknownTaskError
from deltatune.evaluate import encode_inputs, label_prediction
from deltatune.serving.config import ServeConfig
from deltatune.serving.http_errors import error_response
from deltatune.serving.worker import ModelWorker, reload_if_evicted
from deltatune.tasks.encoding import Encoded, collate, max_model_length


@dataclass
class _Job:
    task: str
    inputs: list[str | tuple[str, str]]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class ClassificationEngine(ModelWorker):
    """One DeltaModel, its tokenizer and the worker thread that alone runs the model (`ModelWorker`)."""

    thread_name = "deltatune-serve-worker"

    def __init__(self, model: DeltaModel, tokenizer, config: ServeConfig | None = None):
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_inputs = 0
        self._running: list[_Job] = []  # the jobs of the batch being run (read by /metrics)
        super().__init__(model, tokenizer, config or ServeConfig(), stat_keys=(
            "requests", "inputs", "batches", "mixed_batches", "max_tasks_in_batch", "max_batch_inputs", "rejected",
            "failed"))

    # ---- for the HTTP side (any thread) --------------------------------------------------------------
    def check_task(self, task: str) -> None:
        if task != BASE_TASK and task not in self._tasks:
            raise UnknownTaskError(f"unknown task {task!r}; tasks loaded: {sorted(self._tasks)} (or 'base')")

    def submit(self, task: str, inputs: list[str | tuple[str, str]]) -> Future:
        """Queue a prediction; its future gives one result dict per input. Raises UnknownTaskError, Overloaded."""
        self.check_task(task)
        job = _Job(task, list(inputs))
        with self._condition:
            self._admit(len(self._pending))
            self._pending.append(job)
            self._pending_inputs += len(job.inputs)
            self.stats["requests"] += 1
            self.prometheus.requests.labels(task).inc()
            self.cache.used(task)
            self._condition.notify_all()
        return job.future

    def metrics(self) -> dict[str, Any]:
        with self._condition:
            waiting = len(self._pending)
        return {**self.stats, "queue": waiting, "tasks": len(self._tasks)}

    def _running_and_waiting(self) -> tuple[list[str], list[str]]:
        with self._condition:
            waiting = [job.task for job in self._pending]
        return [job.task for job in self._running], waiting

    # ---- on the worker thread -------------------------------------------------------------------------
    def _task_entry(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        return {"method": info["method"], "labels": info["label_names"], "path": info.get("path")}

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                work = self._next_work()
                if work is None:
                    return
                if isinstance(work, tuple):
                    self._run_control(*work)
                else:
                    self._run_batch(work)
                self._release_memory()

    def _next_work(self):
        """A control call, or the jobs of the next batch (None: closing). Waits for company up to max_wait."""
        config = self.config
        with self._condition:
            while not (self._pending or self._control or self._closing):
                self._condition.wait()
            if self._control:
                return self._control.popleft()
            if not self._pending:
                return None  # closing
            deadline = self._pending[0].arrived + config.max_wait_ms / 1000
            while self._pending_inputs < config.max_batch_size and not (self._control or self._closing):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._condition.wait(remaining)
            jobs, count = [], 0
            while self._pending and (not jobs or count + len(self._pending[0].inputs) <= config.max_batch_size):
                job = self._pending.popleft()
                jobs.append(job)
                count += len(job.inputs)
            self._pending_inputs -= count
            return jobs

    def _run_batch(self, jobs: list[_Job]) -> None:
        self._running = jobs
        try:
            self._predict(jobs)
        finally:
            self._running = []

    def _predict(self, jobs: list[_Job]) -> None:
        examples: list[tuple[_Job, Encoded]] = []
        max_length = max_model_length(self.model, self.tokenizer, self.config.max_length)
        for job in jobs:
            try:
                self.check_task(job.task)  # it may have been removed while the job waited
                examples += [(job, item) for item in encode_inputs(self.tokenizer, job.inputs, max_length)]
            except Exception as error:  # noqa: BLE001 - this job fails, the others run
                self.stats["failed"] += 1
                job.future.set_exception(error)
        live = [job for job in jobs if not job.future.done()]
        try:
            rows = self._forward(examples)
        except Exception as error:  # noqa: BLE001
            self.stats["failed"] += len(live)
            for job in live:
                job.future.set_exception(error)
            return
        self.stats["inputs"] += len(examples)  # counted before any caller can read the metrics
        for job in live:
            self.prometheus.inputs.labels(job.task).inc(len(job.inputs))
        start = 0
        for job in live:
            job.future.set_result([self._prediction(job.task, text, row) for text, row in
                                   zip(job.inputs, rows[start : start + len(job.inputs)])])
            start += len(job.inputs)

    def _forward(self, examples: list[tuple[_Job, Encoded]]) -> list[torch.Tensor]:
        """Logits of every example, in order: mixed-task passes of at most max_batch_size inputs."""
        rows: list[torch.Tensor] = []
        device = next(self.model.parameters()).device
        size = self.config.max_batch_size
        for start in range(0, len(examples), size):
            chunk = examples[start : start + size]
            batch = collate([item for _, item in chunk], self.tokenizer.pad_token_id)
            tasks = [job.task for job, _ in chunk]
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}, tasks=tasks).logits.float().cpu()
            rows += list(logits)
            self.stats["batches"] += 1
            distinct = len(set(tasks))
            self.stats["mixed_batches"] += distinct > 1
            self.stats["max_tasks_in_batch"] = max(self.stats["max_tasks_in_batch"], distinct)
            self.stats["max_batch_inputs"] = max(self.stats["max_batch_inputs"], len(chunk))
            self.prometheus.batch_size.observe(len(chunk))
        return rows

    def _prediction(self, task: str, text, row: torch.Tensor) -> dict[str, Any]:
        """As `deltatune predict` prints it: a label and each label's probability (or a score)."""
        return label_prediction(text, row, self._tasks[task]["labels"] if task in self._tasks else None)


# ---- HTTP ----------------------------------------------------------------------------------------------
Text = Annotated[str, StringConstraints(max_length=100_000)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="a loaded task's name, or 'base' for the base model without a delta")
    inputs: list[Text | tuple[Text, Text]] = Field(
        min_length=1, description="texts to classify (at most --max-inputs); a sentence pair as [first, second]")


class Prediction(BaseModel):
    input: str | list[str]
    label: str | None = None
    probabilities: dict[str, float] | None = None
    score: float | None = None


class PredictResponse(BaseModel):
    task: str
    predictions: list[Prediction]


def add_classification_routes(app: FastAPI, engine: ClassificationEngine) -> None:
    """POST /v1/predict on `app`, served by `engine`."""

    @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
              responses={404: {"description": "unknown task"}, 429: {"description": "the queue is full"}})
    async def predict(request: PredictRequest):
        if len(request.inputs) > engine.config.max_inputs:
            return JSONResponse({"detail": f"{len(request.inputs)} inputs in one request; at most "
                                           f"{engine.config.max_inputs} (--max-inputs)"}, status_code=422)
        try:  # an unknown task (or one removed while the request waited), a full queue, an input that fails
            await reload_if_evicted(engine, request.task)
            predictions = await asyncio.wrap_future(engine.submit(request.task, request.inputs))
        except Exception as error:  # noqa: BLE001 - answered by serving/http_errors.py's table
            return error_response(error, tasks=sorted(engine.tasks))
        return {"task": request.task, "predictions": predictions}
