"""`deltatune serve`: many task deltas on one base model behind HTTP, requests batched ACROSS tasks.

    deltatune serve --model minilm --delta sst2=runs/sst2/delta --delta rte=runs/rte/delta --port 8000
    curl -s localhost:8000/v1/predict -d '{"task": "sst2", "inputs": ["a charming film", "a dull one"]}'

Endpoints: `POST /v1/predict` ({"task", "inputs"} -> a label and probabilities per input, as `deltatune
predict` prints them), `GET /v1/tasks`, `POST /v1/tasks` ({"name", "path"}: load a delta while serving),
`DELETE /v1/tasks/{name}`, `GET /health`, `GET /metrics` (counters: batches, mixed batches, rejections);
the OpenAPI schema at `/openapi.json` (browsable at `/docs`).

How requests become batches: a request handler only puts a job (task + texts) in a bounded queue and awaits
it. One worker thread owns the model. It takes the oldest job, waits up to `max_wait_ms` after that job
arrived for others (until `max_batch_size` inputs), and runs them all, whatever their tasks, as ONE
mixed-task forward pass: `model(**batch, tasks=[one task per input])`. Loading and removing deltas run on the
same thread, between batches, so the model is never changed under a running pass. When `queue_size`
requests wait already, a new one is answered 429 with Retry-After: memory stays bounded under overload.

Errors: an unknown task is 404 with the list of tasks; a malformed body 422; a delta that cannot be loaded
400 with the reason (the tasks already loaded keep serving); a name taken 409. Full fine-tuning deltas are
whole models and cannot share a batch: `serve` refuses them.

Generation: for a causal LM (`--kind auto` sees its architecture) the server speaks OpenAI's API instead
(`deltatune.serving.openai_routes`: /v1/completions, /v1/chat/completions, /v1/models), every request naming its task as
`model`, all of them decoding in one continuously batched loop (`deltatune.serving.decode_loop`).

Safe by default: it binds 127.0.0.1; with `--api-key` (or $DELTATUNE_API_KEY) every route but /health needs
`Authorization: Bearer KEY` (401); bodies over --max-body-bytes get 413; loading and removing deltas over HTTP
(/v1/tasks) is off (403) unless `--allow-loading --delta-root DIR`, and then only from folders under DIR (a `..`
or a symlink leading out of it: 400).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import socket
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
from deltatune.errors import DeltaTuneError, TaskError
from deltatune.evaluate import encode_inputs, label_prediction
from deltatune.serving.config import API_KEY_VARIABLE, Overloaded, ServeConfig, ShuttingDown, delta_under_root
from deltatune.serving.worker import ModelWorker
from deltatune.tasks.encoding import Encoded, collate, max_model_length


@dataclass
class _Job:
    task: str
    inputs: list[str | tuple[str, str]]
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class Engine(ModelWorker):
    """One DeltaModel, its tokenizer and the worker thread that alone runs the model (`ModelWorker`)."""

    thread_name = "deltatune-serve-worker"

    def __init__(self, model: DeltaModel, tokenizer, config: ServeConfig | None = None):
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_inputs = 0
        super().__init__(model, tokenizer, config or ServeConfig(), stat_keys=(
            "requests", "inputs", "batches", "mixed_batches", "max_tasks_in_batch", "max_batch_inputs", "rejected",
            "failed"))

    # ---- for the HTTP side (any thread) --------------------------------------------------------------
    def check_task(self, task: str) -> None:
        if task != BASE_TASK and task not in self._tasks:
            raise TaskError(f"unknown task {task!r}; tasks loaded: {sorted(self._tasks)} (or 'base')")

    def submit(self, task: str, inputs: list[str | tuple[str, str]]) -> Future:
        """Queue a prediction; its future gives one result dict per input. Raises TaskError, Overloaded."""
        self.check_task(task)
        job = _Job(task, list(inputs))
        with self._condition:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.config.queue_size:
                self.stats["rejected"] += 1
                raise Overloaded(f"{len(self._pending)} requests are waiting already (queue_size); retry shortly")
            self._pending.append(job)
            self._pending_inputs += len(job.inputs)
            self.stats["requests"] += 1
            self._condition.notify_all()
        return job.future

    def metrics(self) -> dict[str, Any]:
        with self._condition:
            waiting = len(self._pending)
        return {**self.stats, "queue": waiting, "tasks": len(self._tasks)}

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


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the task's name in requests")
    path: str = Field(description="a delta folder (delta.json + delta.safetensors) under the server's --delta-root")


class _Guard:
    """ASGI middleware in front of every route: the API key (when one is set: all routes but /health) and the
    body size limit (413, counted as the body arrives, so a chunked body cannot slip past a Content-Length check)."""

    def __init__(self, app, config: ServeConfig, openai_paths: tuple[str, ...]):
        self.app, self.config, self.openai_paths = app, config, openai_paths

    def _refuse(self, path: str, status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
        if path.startswith(self.openai_paths):
            from deltatune.serving.openai_routes import openai_error

            return openai_error(status, message, code=code, headers=headers)
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        key = self.config.api_key
        if key and path != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                problem = "no API key given" if not given else "the API key is wrong"
                response = self._refuse(path, 401, f"{problem}: send 'Authorization: Bearer <key>' (the server's "
                                                   f"--api-key / ${API_KEY_VARIABLE})", "invalid_api_key",
                                        {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        limit = self.config.max_body_bytes
        too_large = self._refuse(path, 413, f"the request body exceeds {limit} bytes (--max-body-bytes)",
                                 "request_too_large")
        if int(headers.get(b"content-length", b"0") or 0) > limit:
            return await too_large(scope, receive, send)
        received, exceeded = 0, False

        async def counted_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # the app sees the client leave; its answer is replaced by 413
                    exceeded = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await too_large(scope, receive, send)


def create_app(engine) -> FastAPI:
    """The FastAPI application around an engine (started by the caller): a classification `Engine` (/v1/predict)
    or a generation `DecodeLoop` (the OpenAI-compatible routes of `deltatune.serving.openai_routes`)."""
    from deltatune._version import __version__

    generation = not isinstance(engine, Engine)
    app = FastAPI(title="deltatune serve", version=__version__,
                  description="Many task deltas on one base model; requests are batched across tasks.")
    config: ServeConfig = engine.config
    openai_paths: tuple[str, ...] = ()
    if generation:
        from fastapi.exceptions import RequestValidationError

        from deltatune.serving.openai_routes import OPENAI_ROUTES, add_openai_routes, validation_error

        openai_paths = OPENAI_ROUTES
        add_openai_routes(app, engine)
        default_handler = app.exception_handlers[RequestValidationError]

        @app.exception_handler(RequestValidationError)
        async def invalid(request, error: RequestValidationError):
            if request.url.path.startswith(OPENAI_ROUTES):
                return validation_error(error)
            return await default_handler(request, error)
    app.add_middleware(_Guard, config=config, openai_paths=openai_paths)

    def unknown(error: TaskError) -> JSONResponse:
        return JSONResponse({"detail": error.args[0], "tasks": sorted(engine.tasks)}, status_code=404)

    def overloaded(error: Overloaded) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=error.status, headers={"Retry-After": "1"})

    if not generation:
        @app.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True,
                  responses={404: {"description": "unknown task"}, 429: {"description": "the queue is full"}})
        async def predict(request: PredictRequest):
            if len(request.inputs) > engine.config.max_inputs:
                return JSONResponse({"detail": f"{len(request.inputs)} inputs in one request; at most "
                                               f"{engine.config.max_inputs} (--max-inputs)"}, status_code=422)
            try:
                future = engine.submit(request.task, request.inputs)
            except TaskError as error:
                return unknown(error)
            except Overloaded as error:
                return overloaded(error)
            try:
                predictions = await asyncio.wrap_future(future)
            except TaskError as error:  # removed while the request waited
                return unknown(error)
            except DeltaTuneError as error:
                return JSONResponse({"detail": str(error)}, status_code=400)
            return {"task": request.task, "predictions": predictions}

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"tasks": [{"name": name, **{k: v for k, v in info.items() if k != "prompt_format"}}
                          for name, info in engine.tasks.items()]}

    def loading_refused() -> JSONResponse | None:
        if config.allow_loading:
            return None
        return JSONResponse({"detail": "loading and removing deltas over HTTP is off; start the server with "
                                       "--allow-loading --delta-root DIR"}, status_code=403)

    @app.post("/v1/tasks", status_code=201, responses={400: {"description": "the delta cannot be loaded"},
                                                       403: {"description": "loading over HTTP is off"},
                                                       409: {"description": "the name is taken"}})
    async def load_task(request: LoadRequest):
        refused = loading_refused()
        if refused:
            return refused
        if request.name in engine.tasks:
            return JSONResponse({"detail": f"task {request.name!r} is loaded already; DELETE it first"}, 409)
        try:
            path = delta_under_root(config.delta_root, request.path)
            return await asyncio.wrap_future(engine.load(request.name, path))
        except DeltaTuneError as error:  # DeltaError (bad files, another base model...), TaskError (bad name)
            return JSONResponse({"detail": str(error)}, status_code=400)

    @app.delete("/v1/tasks/{name}", responses={403: {"description": "loading over HTTP is off"},
                                               404: {"description": "unknown task"}})
    async def delete_task(name: str):
        refused = loading_refused()
        if refused:
            return refused
        if name not in engine.tasks:
            return unknown(TaskError(f"unknown task {name!r}; tasks loaded: {sorted(engine.tasks)}"))
        await asyncio.wrap_future(engine.remove(name))
        return {"deleted": name}

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "worker stopped"}, status_code=503)
        return {"status": "ok", "tasks": sorted(engine.tasks), "queue": engine.metrics()["queue"]}

    @app.get("/metrics")
    async def metrics():
        return engine.metrics()

    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free port; read it back with sock.getsockname()[1])."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def serve_kind(model_name: str, config: ServeConfig) -> str:
    """"classification" or "generation": as configured, or (auto) from the model's architecture."""
    if config.kind != "auto":
        return config.kind
    from transformers import AutoConfig

    from deltatune.models import resolve_model_path

    architectures = AutoConfig.from_pretrained(resolve_model_path(model_name)).architectures or []
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    return "generation" if causal else "classification"


def build_engine(model_name: str, deltas: dict[str | None, str], config: ServeConfig | None = None):
    """Load the base model and its tokenizer, and every delta given: a classification `Engine` (the model with a
    classification head) or, for a causal LM, a generation `DecodeLoop` (see `serve_kind`).

    `deltas`: {task name (None: the name saved in the delta): delta folder}."""
    from deltatune.models import load_model, load_tokenizer

    config = config or ServeConfig()
    if serve_kind(model_name, config) == "generation":
        from deltatune.serving.decode_loop import DecodeLoop

        engine = DecodeLoop(DeltaModel(load_model(model_name, "causal-lm", quantize=config.quantize)),
                            load_tokenizer(model_name), config)
    else:
        engine = Engine(DeltaModel(load_model(model_name, "classification", quantize=config.quantize)),
                        load_tokenizer(model_name), config)
    for name, path in deltas.items():
        try:
            engine._load(name, path)  # the worker has not started: this thread owns the model still
        except DeltaTuneError as error:
            raise DeltaTuneError(f"--delta {name or ''}{'=' if name else ''}{path}: {error}") from error
    return engine


def serve(model_name: str, deltas: dict[str | None, str], host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None) -> None:
    """Run the server in the foreground until interrupted (what `deltatune serve` does)."""
    import uvicorn

    engine = build_engine(model_name, deltas, config).start()
    sock = bind(host, port)
    routes = "/v1/predict" if isinstance(engine, Engine) else "/v1/completions, /v1/chat/completions, /v1/models"
    print(f"deltatune serve: http://{host}:{sock.getsockname()[1]} ({routes}; tasks: "
          f"{', '.join(engine.tasks) or 'none'}; API key {'required' if engine.config.api_key else 'off'}; "
          f"API schema at /docs)", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
