"""How `deltatune serve` answers an error: one table from error type to HTTP status, used by every route.

The classification and management routes answer `{"detail": message}` (and, for an unknown task, the tasks
loaded); the OpenAI routes (`openai_routes.py`) answer in OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, so the `openai` client raises its own exception classes. Both take the status from `ANSWERS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

from deltatune.errors import DeltaTuneError, LimitError, LoadingOff, Overloaded, ShuttingDown, UnknownTaskError


@dataclass(frozen=True)
class Answer:
    status: int
    code: str | None = None  # OpenAI's error `code`
    param: str | None = None  # OpenAI's `param`: the request field at fault
    retry: bool = False  # with `Retry-After: 1`: the same request may succeed shortly


# the first row whose type the error is an instance of answers it: subclasses before their bases
ANSWERS: tuple[tuple[type[BaseException], Answer], ...] = (
    (UnknownTaskError, Answer(404, "model_not_found", "model")),  # the task named is not loaded (OpenAI: model)
    (ShuttingDown, Answer(503, "shutting_down", retry=True)),
    (Overloaded, Answer(429, "queue_full", retry=True)),  # --queue-size requests wait already
    (LimitError, Answer(400, "limit_exceeded")),  # over --max-prompt-tokens, --max-tokens, --max-n
    (LoadingOff, Answer(403)),  # /v1/tasks without --allow-loading
    (DeltaTuneError, Answer(400)),  # anything else the request got wrong: a bad delta or name, an option...
)
INTERNAL = Answer(500)  # not the request's fault


def answer_for(error: BaseException) -> Answer:
    return next((answer for kind, answer in ANSWERS if isinstance(error, kind)), INTERNAL)


def error_response(error: BaseException, openai: bool = False, tasks: list[str] | None = None) -> JSONResponse:
    """The HTTP answer to `error` raised while a request was checked, queued or ran: OpenAI's shape if `openai`,
    else `{"detail"}` (with `tasks`, the tasks loaded, when the task was unknown)."""
    answer = answer_for(error)
    message = str(error) if answer is not INTERNAL else f"internal error: {type(error).__name__}: {error}"
    headers = {"Retry-After": "1"} if answer.retry else None
    if openai:
        return openai_error(answer.status, message, answer.param, answer.code, headers)
    body = {"detail": message}
    if isinstance(error, UnknownTaskError) and tasks is not None:
        body["tasks"] = tasks
    return JSONResponse(body, status_code=answer.status, headers=headers)


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
