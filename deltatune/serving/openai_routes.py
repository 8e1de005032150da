"""OpenAI-compatible generation routes of `deltatune serve`: the official `openai` client works unmodified.

    deltatune serve --model smollm2 --delta e2e=runs/e2e/delta --delta chat=runs/chat/delta
    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="...")
    client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi"}])

`model` names a loaded task (or "base": no delta). `POST /v1/completions` continues the prompt text as given;
`POST /v1/chat/completions` builds the prompt the way the task's delta was trained (its chat template, or its
prompt template for one user message; an Alpaca delta also takes a system message, its instruction, before the
user's, its input) — as `deltatune generate` / `predict` do. `GET /v1/models` lists "base" and every task.
Fields: max_tokens (max_completion_tokens), temperature (0: greedy), top_p, stop, seed, n, stream (server-sent
events in OpenAI's chunk format, ending with `data: [DONE]`), stream_options.include_usage; `usage` counts tokens.
Errors come in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 (a limit, an unsupported
option, a body that is not JSON), 401 (no or a wrong API key), 404 (unknown model), 413 (body too large), 422 (a
malformed field), 429 (the queue is full; Retry-After). Requests run in `deltatune.serving.decode_loop.DecodeLoop`
(continuous batching).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from deltatune.core.component import BASE_TASK
from deltatune.errors import ClientGone, DeltaTuneError, UnknownTaskError
from deltatune.serving.decode_loop import DecodeLoop, Event, Sampling
from deltatune.serving.http_errors import error_response, openai_error
from deltatune.serving.worker import reload_if_evicted
from deltatune.tasks.generation import chat_prompt_ids

OPENAI_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models")
Text = Annotated[str, StringConstraints(max_length=1_000_000)]


# ---- errors ------------------------------------------------------------------------------------------------
def error_for(error: BaseException) -> JSONResponse:
    """The HTTP answer to an error raised while a request was checked, queued or ran (`http_errors.ANSWERS`)."""
    return error_response(error, openai=True)


def validation_error(error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in OpenAI's shape: the first problem, with the field's path as `param`."""
    problems = error.errors()
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":  # loc is ("body", character offset), not a field
        offset = first["loc"][-1] if first.get("loc") else "?"
        reason = (first.get("ctx") or {}).get("error", "JSON decode error")
        return openai_error(400, f"the request body is not valid JSON: {reason} at character "
                            f"{offset}", None, "invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = f"{'.'.join(location) or 'body'}: {first.get('msg')}"
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return openai_error(422, message, ".".join(location) or None, "invalid_value")


# ---- requests ----------------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of newer API versions pass; the ones that matter are checked

    model: str = Field(description="a loaded task's name, or 'base' for the base model without a delta")
    max_tokens: int | None = Field(default=None, ge=1, description="new tokens at most (default: 16)")
    temperature: float = Field(default=1.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = Field(default=None, description="up to 4 strings that end a choice (not returned)")
    seed: int | None = Field(default=None, ge=0, description="the same seed, prompt and settings: the same tokens")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(default=False, description="vLLM's extension: generate max_tokens tokens, EOS or not")
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    # options this server does not implement, refused by name rather than ignored: {name: the values allowed}
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"presence_penalty": (None, 0), "frequency_penalty": (None, 0),
                                   "logit_bias": (None, {})}

    def sampling(self, limit_default: int) -> Sampling:
        for name, allowed in {**_Common.UNSUPPORTED, **type(self).UNSUPPORTED}.items():
            value = getattr(self, name, None) if name in type(self).model_fields else (self.model_extra or {}).get(name)
            if value not in allowed:
                raise DeltaTuneError(f"{name}={value!r} is not supported by this server; leave it out")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):  # the count, not the list: it may be megabytes long
            empty = sum(not s for s in stops)
            raise DeltaTuneError(f"stop takes up to 4 non-empty strings, got {len(stops):,} string(s)"
                                 + (f", {empty:,} of them empty" if empty else ""))
        return Sampling(max_tokens=self.max_tokens or limit_default, temperature=self.temperature, top_p=self.top_p,
                        seed=self.seed, stop=stops, n=self.n, ignore_eos=self.ignore_eos)


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="the text to continue as given (or token ids); a list of texts: one set of choices each")
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"echo": (None, False), "logprobs": (None,), "suffix": (None, "")}


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Text | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise DeltaTuneError("message content parts other than text are not supported by this server")
        return "".join(part["text"] for part in self.content)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, description="as max_tokens")
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "logprobs": (None, False), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
        "response_format": (None, {"type": "text"})}


# ---- running a request -------------------------------------------------------------------------------------
class _Generation:
    """The requests of one HTTP call (one per prompt) and their events, merged into one asyncio queue."""

    def __init__(self, loop: DecodeLoop, task: str, prompts: list[list[int]], sampling: Sampling):
        self.loop, self.sampling, self.prompts = loop, sampling, prompts
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        running = asyncio.get_running_loop()
        self.requests = []
        try:
            for number, ids in enumerate(prompts):
                def emit(event: Event, number=number) -> None:
                    running.call_soon_threadsafe(self.queue.put_nowait, (number, event))

                self.requests.append(loop.submit(task, ids, sampling, emit))
        except BaseException:
            self.cancel()
            raise
        self.open = len(prompts) * sampling.n  # choices not finished yet
        self.completion_tokens = 0

    @property
    def prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompts)

    def cancel(self) -> None:
        for request in self.requests:
            self.loop.cancel(request)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice finished; an error event raises its error."""
        while self.open:
            number, event = await self.queue.get()
            if event.error is not None:
                self.cancel()
                raise event.error
            if event.finish_reason:
                self.open -= 1
                self.completion_tokens += event.completion_tokens
            yield number * self.sampling.n + event.index, event

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def add_openai_routes(app: FastAPI, loop: DecodeLoop) -> None:
    """/v1/models, /v1/completions and /v1/chat/completions on `app`, served by `loop`."""
    started = int(time.time())
    tokenizer = loop.tokenizer
    default_invalid = app.exception_handlers[RequestValidationError]

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        if request.url.path.startswith(OPENAI_ROUTES):
            return validation_error(error)
        return await default_invalid(request, error)

    def model_card(name: str) -> dict[str, Any]:
        info = loop.tasks.get(name, {})
        return {"id": name, "object": "model", "created": started, "owned_by": "deltatune",
                "method": info.get("method"), "path": info.get("path")}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(name) for name in [BASE_TASK, *loop.tasks]]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        if name != BASE_TASK and name not in loop.tasks:
            return error_for(UnknownTaskError(f"unknown model {name!r}; loaded: {[BASE_TASK, *sorted(loop.tasks)]}"))
        return model_card(name)

    def task_of(model: str) -> tuple[dict | None, bool]:
        """(the task's saved prompt format, whether it is a delta); UnknownTaskError if no such model is loaded."""
        loop.check_task(model)
        return loop.tasks.get(model, {}).get("prompt_format"), model != BASE_TASK

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        try:
            await reload_if_evicted(loop, request.model)
            task_of(request.model)
            sampling = request.sampling(16)  # OpenAI's default for completions
            if request.best_of not in (None, request.n):
                raise DeltaTuneError("best_of is not supported by this server (it would need log-probabilities)")
            prompts = _completion_prompts(request.prompt, tokenizer)
        except DeltaTuneError as error:
            return error_for(error)
        return await _respond(loop, request, prompts, sampling, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        try:
            await reload_if_evicted(loop, request.model)
            prompt_format, delta = task_of(request.model)
            if request.max_completion_tokens is not None:
                request.max_tokens = request.max_completion_tokens
            sampling = request.sampling(loop.config.max_tokens)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in request.messages]
            prompts = [chat_prompt_ids(tokenizer, messages, prompt_format, delta)]
        except DeltaTuneError as error:
            return error_for(error)
        except Exception as error:  # noqa: BLE001 - a chat template that raises on these messages (jinja)
            return openai_error(400, f"the chat template cannot render these messages: {error}", "messages")
        return await _respond(loop, request, prompts, sampling, http, chat=True)


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if not prompt:
        raise DeltaTuneError("prompt is an empty list; send a text")
    return [tokenizer(item, add_special_tokens=False)["input_ids"] if isinstance(item, str) else list(item)
            for item in prompt]


async def _respond(loop: DecodeLoop, request: _Common, prompts: list[list[int]], sampling: Sampling, http: Request,
                   chat: bool):
    vocabulary = len(loop.tokenizer)
    if any(not 0 <= token < vocabulary for ids in prompts for token in ids):
        return openai_error(400, f"prompt token ids must lie in [0, {vocabulary})", "prompt")
    try:
        generation = _Generation(loop, request.model, prompts, sampling)
    except DeltaTuneError as error:
        return error_for(error)
    identifier = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    events = generation.events()
    watcher = asyncio.create_task(_cancel_when_gone(http, generation))  # until the stream (or the answer) is made
    try:  # wait for the first event: an error at the prefill is still an HTTP error, not a broken stream
        first = await anext(events)
        if request.stream:
            watcher.cancel()  # from here on the stream notices a client that leaves
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            chunks = _stream(generation, events, first, identifier, created, request.model, chat, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts: dict[int, list[str]] = {}
        finish: dict[int, str] = {}
        pending = first
        while pending is not None:
            index, event = pending
            texts.setdefault(index, []).append(event.text)
            if event.finish_reason:
                finish[index] = event.finish_reason
            pending = await anext(events, None)
    except asyncio.CancelledError:
        generation.cancel()
        raise
    except BaseException as error:  # noqa: BLE001
        generation.cancel()
        return error_for(error)
    finally:
        watcher.cancel()
    choices = []
    for index in sorted(finish):
        text = "".join(texts.get(index, []))
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": index, **content, "logprobs": None, "finish_reason": finish[index]})
    return {"id": identifier, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": request.model, "choices": choices, "usage": generation.usage()}


async def _cancel_when_gone(http: Request, generation: _Generation) -> None:
    """A client that closed its connection before its answer frees its rows (or never takes any), and the
    handler waiting for the answer stops waiting."""
    while not await http.is_disconnected():
        await asyncio.sleep(0.25)
    generation.cancel()
    generation.queue.put_nowait((0, Event(error=ClientGone("the client went away"))))


async def _stream(generation: _Generation, events, first, identifier: str, created: int, model: str, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text (and per finish), then the usage chunk if asked, then
    `data: [DONE]`. A client that goes away cancels this generator: its rows leave the batch at once."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        body = {"id": identifier, "object": kind, "created": created, "model": model, "choices": choices, **extra}
        if include_usage and "usage" not in extra:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    greeted: set[int] = set()
    try:
        pending = first
        while pending is not None:
            index, event = pending
            if chat and index not in greeted:  # each choice's first chunk carries the role
                greeted.add(index)
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            if event.text or event.finish_reason:
                piece = ({"delta": {"content": event.text} if event.text else {}} if chat else {"text": event.text})
                yield chunk([{"index": index, **piece, "logprobs": None, "finish_reason": event.finish_reason}])
            try:
                pending = await anext(events, None)
            except Exception as error:  # noqa: BLE001 - after the first chunk, an error is told inside the stream
                body = json.loads(error_for(error).body)
                yield f"data: {json.dumps(body)}\n\n"
                break
        else:
            if include_usage:
                yield chunk([], usage=generation.usage())
        yield "data: [DONE]\n\n"
    finally:
        generation.cancel()  # a no-op for finished requests; frees the rows of a client that went away
