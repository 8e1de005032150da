"""`deltatune serve`: many task deltas on one base model behind HTTP, requests batched ACROSS tasks.

    deltatune serve --model minilm --delta sst2=runs/sst2/delta --delta rte=runs/rte/delta --port 8000
    curl -s localhost:8000/v1/predict -d '{"task": "sst2", "inputs": ["a charming film", "a dull one"]}'

Endpoints: `POST /v1/predict` ({"task", "inputs"} -> a label and probabilities per input, as `deltatune
predict` prints them), `GET /v1/tasks`, `POST /v1/tasks` ({"name", "path"}: load a delta while serving),
`DELETE /v1/tasks/{name}`, `GET /health`, `GET /metrics` (Prometheus text: `serving/metrics.py`), `GET /stats` (the
counters as JSON: batches, mixed batches, rejections);
the OpenAPI schema at `/openapi.json` (browsable at `/docs`).

How /v1/predict requests become mixed-task batches: `serving/classify.py`. How each error is answered (its
HTTP status): `serving/http_errors.py`.

Errors: an unknown task is 404 with the list of tasks; a malformed body 422; a delta that cannot be loaded
400 with the reason (the tasks already loaded keep serving); a name taken 409. A delta whose method's rows cannot
share a batch (its registry entry: `mixable`, for generation `mixes_in_decode`; full fine-tuning is a whole model)
is refused by name, with the methods that can.

Generation: for a causal LM (`--kind auto` sees its architecture) the server speaks OpenAI's API instead
(`deltatune.serving.openai_routes`: /v1/completions, /v1/chat/completions, /v1/models), every request naming its task as
`model`, all of them decoding in one continuously batched loop (`deltatune.serving.decode_loop`).

Safe by default: it binds 127.0.0.1; with `--api-key` (or $DELTATUNE_API_KEY) every route but /health needs
`Authorization: Bearer KEY` (401), the documentation pages (/docs, /openapi.json) also the key as a browser's
Basic-authentication password (`DOCS_PATHS`); bodies over --max-body-bytes get 413; loading and removing deltas
over HTTP (/v1/tasks) is off (403) unless `--allow-loading --delta-root DIR`, and then only from folders under DIR
(a `..` or a symlink leading out of it: 400).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import socket

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from deltatune.delta import DeltaModel
from deltatune.errors import DeltaTuneError, LoadingOff, UnknownTaskError
from deltatune.serving.classify import ClassificationEngine, add_classification_routes
from deltatune.serving.config import API_KEY_VARIABLE, ServeConfig, delta_under_root
from deltatune.serving.http_errors import error_response, openai_error
from deltatune.serving.metrics import CONTENT_TYPE


class LoadLoRARequest(BaseModel):
    """vLLM's body of POST /v1/load_lora_adapter (vllm/entrypoints/openai/protocol.py, LoadLoRAAdapterRequest)."""

    model_config = ConfigDict(extra="allow")  # vLLM's other fields (lora_int_id...) pass
    lora_name: str = Field(description="the name requests give as `model`")
    lora_path: str = Field(description="a delta folder (deltatune or peft) under the server's --delta-root")
    load_inplace: bool = Field(default=False, description="replace a delta loaded under that name already")


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    lora_name: str


VLLM_ROUTES = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the task's name in requests")
    path: str = Field(description="a delta folder (delta.json + delta.safetensors) under the server's --delta-root")


# With --api-key the API documentation stays behind the key too (its schema names the version and every route),
# yet opens in a browser, which cannot send a Bearer header: these pages (GET only) also take the key as the
# password of HTTP Basic authentication, which the browser asks for. No other route takes Basic: a browser
# sends cached Basic credentials with any request to the server, cross-site POSTs included (CSRF).
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
DOCS_CHALLENGE = 'Basic realm="deltatune serve: the password is the API key (any user name)", charset="UTF-8"'


def _basic_password(authorization: str) -> str:
    """The password of an `Authorization: Basic base64(user:password)` header; "" for anything else."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return ""
    try:
        return base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")[2]
    except (ValueError, UnicodeDecodeError):
        return ""


class _Guard:
    """ASGI middleware in front of every route: the API key (when one is set: all routes but /health) and the
    body size limit (413, counted as the body arrives, so a chunked body cannot slip past a Content-Length check)."""

    def __init__(self, app, config: ServeConfig, openai_paths: tuple[str, ...]):
        self.app, self.config, self.openai_paths = app, config, openai_paths

    def _refuse(self, path: str, status: int, message: str, code: str, headers: dict | None = None) -> JSONResponse:
        if path.startswith(self.openai_paths):
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
            docs = path in DOCS_PATHS and scope["method"] in ("GET", "HEAD")
            if not (hmac.compare_digest(given.encode(), f"Bearer {key}".encode())
                    or docs and hmac.compare_digest(_basic_password(given).encode(), key.encode())):
                problem = "no API key given" if not given else "the API key is wrong"
                response = self._refuse(path, 401, f"{problem}: send 'Authorization: Bearer <key>' (the server's "
                                                   f"--api-key / ${API_KEY_VARIABLE})", "invalid_api_key",
                                        {"WWW-Authenticate": DOCS_CHALLENGE if docs else "Bearer"})
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
    """The FastAPI application around an engine (started by the caller): a `ClassificationEngine` (/v1/predict)
    or a generation `DecodeLoop` (the OpenAI-compatible routes of `deltatune.serving.openai_routes`)."""
    from deltatune._version import __version__

    app = FastAPI(title="deltatune serve", version=__version__,
                  description="Many task deltas on one base model; requests are batched across tasks.")
    openai_paths: tuple[str, ...] = VLLM_ROUTES
    if isinstance(engine, ClassificationEngine):
        add_classification_routes(app, engine)
    else:
        from deltatune.serving.openai_routes import OPENAI_ROUTES, add_openai_routes

        add_openai_routes(app, engine)
        openai_paths += OPENAI_ROUTES
    app.add_middleware(_Guard, config=engine.config, openai_paths=openai_paths)
    if engine.config.api_key:  # /docs' Authorize button: the key as a Bearer token on the calls it makes
        _declare_bearer_key(app)
    _add_task_routes(app, engine)
    _add_vllm_lora_routes(app, engine)

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "worker stopped"}, status_code=503)
        return {"status": "ok", "tasks": sorted(engine.tasks), "queue": engine.metrics()["queue"]}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE: {}}}})
    async def metrics():
        """Prometheus' text format (`serving/metrics.py`): requests and tokens per task, queue depth, batch size,
        time-to-first-token and inter-token histograms, loaded deltas, vLLM's `vllm:lora_requests_info`."""
        return Response(engine.prometheus.render(), media_type=CONTENT_TYPE)

    @app.get("/stats")
    async def stats():
        """The engine's counters as JSON (batches, mixed batches, rejections...)."""
        return engine.metrics()

    return app


def _declare_bearer_key(app: FastAPI) -> None:
    """The OpenAPI schema says every route takes `Authorization: Bearer KEY` (so /docs offers to send it)."""
    plain = app.openapi

    def openapi() -> dict:
        schema = plain()  # built once, then cached by FastAPI: setting the scheme again changes nothing
        schema.setdefault("components", {})["securitySchemes"] = {"APIKey": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"APIKey": []}]
        return schema

    app.openapi = openapi


def _add_task_routes(app: FastAPI, engine) -> None:
    """GET /v1/tasks; POST /v1/tasks and DELETE /v1/tasks/{name} (loading and removing deltas while serving)."""
    config: ServeConfig = engine.config

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"tasks": [{"name": name, **{k: v for k, v in info.items() if k != "prompt_format"}}
                          for name, info in engine.tasks.items()],
                "evicted": sorted(engine.cache.evicted)}  # --max-loaded-deltas: loaded again when requested

    def check_loading() -> None:
        _check_loading(config)

    @app.post("/v1/tasks", status_code=201, responses={400: {"description": "the delta cannot be loaded"},
                                                       403: {"description": "loading over HTTP is off"},
                                                       409: {"description": "the name is taken"}})
    async def load_task(request: LoadRequest):
        try:
            check_loading()
            if request.name in engine.tasks:
                return JSONResponse({"detail": f"task {request.name!r} is loaded already; DELETE it first"}, 409)
            path = delta_under_root(config.delta_root, request.path)
            return await asyncio.wrap_future(engine.load(request.name, path))
        except DeltaTuneError as error:  # DeltaError (bad files, another base model...), TaskError (bad name)
            return error_response(error)

    @app.delete("/v1/tasks/{name}", responses={403: {"description": "loading over HTTP is off"},
                                               404: {"description": "unknown task"}})
    async def delete_task(name: str):
        try:
            check_loading()
            if name not in engine.tasks and engine.forget(name):
                return {"deleted": name}  # evicted: it is not loaded again
            if name not in engine.tasks:
                raise UnknownTaskError(f"unknown task {name!r}; tasks loaded: {sorted(engine.tasks)}")
        except DeltaTuneError as error:
            return error_response(error, tasks=sorted(engine.tasks))
        await asyncio.wrap_future(engine.remove(name))
        return {"deleted": name}


def _check_loading(config: ServeConfig) -> None:
    if not config.allow_loading:
        raise LoadingOff("loading and removing deltas over HTTP is off; start the server with --allow-loading "
                         "--delta-root DIR")


def _add_vllm_lora_routes(app: FastAPI, engine) -> None:
    """vLLM's runtime adapter endpoints (docs.vllm.ai, LoRA Adapters: "Dynamically serving LoRA Adapters"), so a
    client or gateway written for vLLM loads and unloads deltas here: the same bodies, the same plain-text answer
    on success, errors in OpenAI's shape (an unknown name: 404; a name taken without load_inplace: 400). Off (403)
    without --allow-loading, and only from folders under --delta-root, as POST /v1/tasks."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(request: LoadLoRARequest):
        name = request.lora_name
        try:
            _check_loading(engine.config)
            path = delta_under_root(engine.config.delta_root, request.lora_path)
            if name in engine.tasks and not request.load_inplace:
                raise DeltaTuneError(f"The lora adapter '{name}' has already been loaded.")
            if name in engine.tasks:
                await asyncio.wrap_future(engine.remove(name))
            engine.forget(name)
            await asyncio.wrap_future(engine.load(name, path))
        except DeltaTuneError as error:
            return error_response(error, openai=True)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(request: UnloadLoRARequest):
        name = request.lora_name
        try:
            _check_loading(engine.config)
            if name not in engine.tasks and not engine.forget(name):
                raise UnknownTaskError(f"The lora adapter '{name}' cannot be found.")
            if name in engine.tasks:
                await asyncio.wrap_future(engine.remove(name))
        except DeltaTuneError as error:
            return error_response(error, openai=True)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


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


def served_model(model_name: str, kind: str, config: ServeConfig) -> DeltaModel:
    """The base model as served: `config.precision` resolved (auto: bf16 where the hardware has native bf16 math).
    bf16 stores the weights in bf16 (as vLLM serves them), so every matrix product runs in bf16; the deltas loaded
    later take the base's dtype (`float_reference`). The model is wrapped in fp32 first, so the base's fingerprint
    (which deltas are checked against) is the checkpoint's own."""
    import torch

    from deltatune.models import load_model
    from deltatune.training.loop import resolve_precision

    precision = resolve_precision(config.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if config.quantize:  # the quantized layers keep their own storage; the rest is built in the compute dtype
        model = DeltaModel(load_model(model_name, kind, quantize=config.quantize, dtype=dtype))
    else:
        model = DeltaModel(load_model(model_name, kind))
        model.base_model.to(dtype)
    if kind == "causal-lm" and config.packed_linears and _second_copy_fits(model.base_model):
        from deltatune.serving.packed_linear import pack_linear_layers

        pack_linear_layers(model.base_model, config.max_batch_size)  # fp32, native bf16: a CPU with oneDNN
    elif kind == "causal-lm" and config.packed_head:
        from deltatune.serving.packed_linear import pack_output_layer

        pack_output_layer(model.base_model, config.max_batch_size)  # fp32 on a CPU with oneDNN only
    return model


def _second_copy_fits(model) -> bool:
    """Whether the packed copy of the linear weights `--packed-linears` adds takes at most half of the memory the
    system has left (where it tells); if not, a warning and the plain weights only."""
    import warnings

    from deltatune.core.memory import available_memory
    from deltatune.serving.packed_linear import packing_bytes

    extra, available = packing_bytes(model), available_memory()
    if available is None or extra <= available // 2:
        return True
    warnings.warn(f"--packed-linears left off: its copy of the weights would take {extra / 2**30:.1f} GiB of the "
                  f"{available / 2**30:.1f} GiB available (more than half); the server runs the plain weights",
                  stacklevel=2)
    return False


def build_engine(model_name: str, deltas: dict[str | None, str], config: ServeConfig | None = None):
    """Load the base model and its tokenizer, and every delta given: a `ClassificationEngine` (the model with a
    classification head) or, for a causal LM, a generation `DecodeLoop` (see `serve_kind`).

    `deltas`: {task name (None: the name saved in the delta): delta folder}."""
    from deltatune.models import load_tokenizer

    config = config or ServeConfig()
    generation = serve_kind(model_name, config) == "generation"
    model = served_model(model_name, "causal-lm" if generation else "classification", config)
    if generation:
        from deltatune.serving.decode_loop import DecodeLoop

        engine = DecodeLoop(model, load_tokenizer(model_name), config)
    else:
        engine = ClassificationEngine(model, load_tokenizer(model_name), config)
    if config.max_loaded_deltas and len(deltas) > config.max_loaded_deltas:
        raise DeltaTuneError(f"--max-loaded-deltas {config.max_loaded_deltas} is fewer than the {len(deltas)} deltas "
                             f"given with --delta (which stay loaded); raise it")
    for name, path in deltas.items():
        try:
            engine._load(name, path)  # the worker has not started: this thread owns the model still
        except DeltaTuneError as error:
            raise DeltaTuneError(f"--delta {name or ''}{'=' if name else ''}{path}: {error}") from error
    engine.cache.pinned = set(engine.tasks)  # never evicted
    return engine


def _docs_note(config: ServeConfig) -> str:
    if not config.api_key:
        return ""
    return (": the browser asks for a password, give the API key (any user name); its Authorize button takes the key "
            "for the calls")


def serve(model_name: str, deltas: dict[str | None, str], host: str = "127.0.0.1", port: int = 8000,
          config: ServeConfig | None = None) -> None:
    """Run the server in the foreground until interrupted (what `deltatune serve` does)."""
    import uvicorn

    engine = build_engine(model_name, deltas, config).start()
    sock = bind(host, port)
    routes = ("/v1/predict" if isinstance(engine, ClassificationEngine)
              else "/v1/completions, /v1/chat/completions, /v1/models")
    print(f"deltatune serve: http://{host}:{sock.getsockname()[1]} ({routes}; tasks: "
          f"{', '.join(engine.tasks) or 'none'}; API key {'required' if engine.config.api_key else 'off'}; "
          f"API schema at /docs{_docs_note(engine.config)})", flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning")).run(sockets=[sock])
    finally:
        engine.close()
        sock.close()
