"""Continuous batching for generation: one decode loop, many requests, each row decoding under its own delta.

Iteration-level scheduling (Yu et al. 2022, Orca §3.1): requests join and leave the running batch between
two decode steps instead of waiting for a whole batch to finish. S-LoRA (Sheng et al. 2023) and Punica (Chen
et al. 2023) batch rows of different LoRA adapters in one forward pass; here every method whose rows can share a
pass does (LoRA of any rank, BitFit, adapters, prompt and prefix tuning), through the per-row routing of
`DeltaModel` (`task_state.per_example`, read by each component's mixed path).

One thread owns the model. Between two decode steps it:
 1. runs control calls (loading or removing a delta) and drops cancelled requests;
 2. admits waiting requests while rows are free (`max_batch_size`): each prompt is prefilled ALONE under its task
    (`model(..., tasks=[task])`, so prompt tuning prepends its virtual tokens and prefix tuning starts from its
    prefixes exactly as in `DeltaModel.generate`), its first token is sampled, and its KV cache joins the batch's;
 3. runs one forward pass over the last token of every running row, each row under its own task;
 4. samples each row's next token; rows that reach an end-of-sequence token, a stop string or `max_tokens`
    leave at once, and so do rows whose client went away.

The KV cache is one transformers `DynamicCache` for the whole batch, rows left-padded to a common length with
a (B, L) attention mask of ones on real entries: a joining row (or the batch) is padded on the left, a leaving row
is dropped by indexing dim 0, and leading columns left holding only padding are cut. Each row's next position is
its count of real entries (its virtual tokens or prefix included): the position it has when generated alone, as
transformers' left-padded `generate` numbers it (cumulative sum of the mask). Measured alternative: re-stacking
per-row caches each step copies the whole cache every step; padding copies only when a row joins.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.core.component import BASE_TASK
from deltatune.delta import DeltaModel
from deltatune.errors import DeltaTuneError, LimitError, Overloaded, ShuttingDown, UnknownTaskError
from deltatune.evaluate import stop_token_ids
from deltatune.methods.prompt import position_limit
from deltatune.methods.registry import METHODS
from deltatune.serving.config import ServeConfig
from deltatune.serving.worker import ModelWorker


@dataclass
class Sampling:
    """How one request's tokens are chosen (OpenAI's fields)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax), as `deltatune generate` does by default
    top_p: float = 1.0
    seed: int | None = None  # with a seed, choice i draws from torch.Generator().manual_seed(seed + i)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    ignore_eos: bool = False  # generate max_tokens whatever the model says (vLLM's extension; benchmarks)


@dataclass
class Event:
    """What the decode loop tells a request, on its own thread: new text of choice `index`, its end
    (`finish_reason` "stop" or "length", with `completion_tokens`), or an error (`error`, for every choice)."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    task: str | None  # None: the base model
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]  # called on the decode thread: must only hand the event over
    arrived: float = field(default_factory=time.monotonic)
    cancelled: bool = False  # set by the client's side (disconnected): its rows leave at the next step
    failed: bool = False
    running: int = 0  # its rows in the batch


@dataclass(eq=False)
class _Row:
    request: Request
    index: int  # the choice
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text handed to the client
    done: bool = False


class DecodeLoop(ModelWorker):
    """A causal LM with its deltas, its tokenizer and the thread that alone runs them (see the module doc)."""

    thread_name = "deltatune-decode-loop"

    def __init__(self, model: DeltaModel, tokenizer, config: ServeConfig | None = None):
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.positions = position_limit(model.config)
        self._waiting: collections.deque[Request] = collections.deque()
        self._rows: list[_Row] = []
        self._cache = None  # the batch's DynamicCache
        self._mask: torch.Tensor | None = None  # (B, L) long: 1 on real cache entries
        self._last: torch.Tensor | None = None  # (B,) the token each row feeds next
        super().__init__(model, tokenizer, config or ServeConfig(kind="generation"), stat_keys=(
            "requests", "rejected", "cancelled", "failed", "finished", "steps", "mixed_steps", "tokens", "max_rows",
            "max_tasks_in_step"))

    # ---- any thread ------------------------------------------------------------------------------------
    def check_task(self, task: str) -> str | None:
        """The task's name as the model routes it (None: the base model); UnknownTaskError if none is loaded by that
        name."""
        if task == BASE_TASK:
            return None
        if task not in self._tasks:
            raise UnknownTaskError(f"unknown model {task!r}; loaded: {[BASE_TASK, *sorted(self._tasks)]}")
        return task

    def submit(self, task: str, prompt_ids: list[int], sampling: Sampling, emit: Callable[[Event], None]) -> Request:
        """Queue a generation. Raises UnknownTaskError, LimitError (too long, too many), Overloaded."""
        routed = self.check_task(task)
        self.check_limits(task, len(prompt_ids), sampling)
        request = Request(routed, list(prompt_ids), sampling, emit)
        with self._condition:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) >= self.config.queue_size:
                self.stats["rejected"] += 1
                raise Overloaded(f"{len(self._waiting)} requests are waiting already (--queue-size); retry shortly")
            self._waiting.append(request)
            self.stats["requests"] += 1
            self._condition.notify_all()
        return request

    def check_limits(self, task: str, prompt_tokens: int, sampling: Sampling) -> None:
        config = self.config
        if prompt_tokens < 1:
            raise LimitError("the prompt is empty (0 tokens); send some text")
        if prompt_tokens > config.max_prompt_tokens:
            raise LimitError(f"the prompt has {prompt_tokens} tokens; this server takes at most "
                             f"{config.max_prompt_tokens} (--max-prompt-tokens)")
        if sampling.max_tokens > config.max_tokens:
            raise LimitError(f"max_tokens={sampling.max_tokens}; this server allows at most {config.max_tokens} "
                             f"(--max-tokens)")
        if sampling.n > config.max_n:
            raise LimitError(f"n={sampling.n}; this server allows at most {config.max_n} choices (--max-n)")
        if sampling.n > config.max_batch_size:
            raise LimitError(f"n={sampling.n} choices cannot decode together in a batch of --max-batch-size "
                             f"{config.max_batch_size}")
        virtual = self._tasks.get(task, {}).get("virtual_tokens", 0)
        if self.positions is not None and virtual + prompt_tokens + sampling.max_tokens > self.positions:
            what = f" + {virtual} virtual tokens of {task!r}" if virtual else ""
            raise LimitError(f"{prompt_tokens} prompt tokens{what} + max_tokens {sampling.max_tokens} exceed the "
                             f"model's {self.positions} positions; shorten the prompt or lower max_tokens")

    def cancel(self, request: Request) -> None:
        """The client went away: its rows leave the batch at the next step (or it never joins)."""
        with self._condition:
            request.cancelled = True
            self._condition.notify_all()

    def metrics(self) -> dict[str, Any]:
        with self._condition:
            waiting = len(self._waiting)
        return {**self.stats, "queue": waiting, "running": len(self._rows), "tasks": len(self._tasks)}

    # ---- deltas (on the decode thread, or before it starts) ----------------------------------------------
    def _refusal(self, task: str, method: str, path) -> str | None:
        components = [c for c in self.model.components().values() if task in c.tasks]
        if not METHODS[method].mixable or any(not c.mixes_in_generate for c in components):
            return (f"{path} is a {method} delta, whose rows cannot decode in a batch with other tasks; serve a "
                    f"delta of LoRA, BitFit, adapters, prompt or prefix tuning (or merge it into its own model and "
                    f"serve that)")
        return None

    def _remove(self, name: str) -> None:
        self.model.remove_task(name)
        leaving = [row for row in self._rows if row.request.task == name]
        for request in {row.request for row in leaving}:
            self._fail(request, UnknownTaskError(f"task {name!r} was removed while this request ran"))
        self._drop([row for row in self._rows if row.request.task != name])
        self._refresh_tasks()

    def _task_entry(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        return {"method": info["method"], "path": info.get("path"), "prompt_format": info.get("prompt_format"),
                "virtual_tokens": _virtual_tokens(self.model, name)}

    # ---- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                admitted, controls = self._next_work()
                if admitted is None:
                    break
                for control in controls:
                    self._run_control(*control)
                for request in admitted:
                    try:
                        self._join(request)
                    except Exception as error:  # noqa: BLE001 - answered, never left waiting
                        self._fail(request, error)
                try:
                    self._drop_finished()
                    if self._rows:
                        self._step()
                except Exception as error:  # noqa: BLE001 - every running request fails, the loop goes on
                    for request in {row.request for row in self._rows}:
                        self._fail(request, error)
                    self._drop([])
                self._release_memory()
        for request in {row.request for row in self._rows} | set(self._waiting):
            self._fail(request, ShuttingDown("the server is shutting down"))

    def _next_work(self) -> tuple[list[Request] | None, list]:
        """(requests to admit now, control calls); waits while there is nothing to do. (None, []): closing."""
        with self._condition:
            while not (self._waiting or self._control or self._rows or self._closing):
                self._condition.wait()
            if self._closing:
                return None, []
            controls = list(self._control)
            self._control.clear()
            admitted, free = [], self.config.max_batch_size - len(self._rows)
            while self._waiting and (self._waiting[0].cancelled or self._waiting[0].sampling.n <= free):
                request = self._waiting.popleft()
                if request.cancelled:
                    self.stats["cancelled"] += 1
                    continue
                admitted.append(request)
                free -= request.sampling.n
            return admitted, controls

    def _join(self, request: Request) -> None:
        """Prefill the prompt alone under its task, sample each choice's first token, splice its cache in."""
        if request.task is not None and request.task not in self.model.task_info:
            self._fail(request, UnknownTaskError(f"task {request.task!r} was removed while this request waited"))
            return
        count = request.sampling.n
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(62)
        rows = [_Row(request, i, None if request.sampling.temperature == 0
                     else torch.Generator(device="cpu").manual_seed(seed + i)) for i in range(count)]
        ids = torch.tensor([request.prompt_ids], device=self.device)
        try:  # nothing of the batch changes before the splice: a failing prompt fails its request alone
            output = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), tasks=[request.task or BASE_TASK],
                                use_cache=True, logits_to_keep=1)
            cache = output.cache
            length = _cache_layers(cache)[0].keys.shape[-2]  # the prompt + virtual tokens / prefix
            first = self._sample(rows, output.logits[:, -1].float().expand(count, -1))
        except Exception as error:  # noqa: BLE001 - e.g. a prompt that does not fit beside its prompt-tuning prompt
            self._fail(request, error)
            return
        if count > 1:
            cache.batch_repeat_interleave(count)
        self._splice(cache, torch.ones(count, length, dtype=torch.long, device=self.device))
        self._rows += rows
        self._last = first if self._last is None else torch.cat([self._last, first])
        request.running = count
        self._emit_tokens(rows, first.tolist())

    def _splice(self, cache, mask: torch.Tensor) -> None:
        """Append the rows of `cache` (mask (b, l)) to the batch's, left-padding the shorter of the two."""
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        width = max(self._mask.shape[1], mask.shape[1])

        def pad(tensor: torch.Tensor, length: int) -> torch.Tensor:  # (B, H, L, hd) -> (B, H, width, hd)
            return nn.functional.pad(tensor, (0, 0, width - length, 0)) if width > length else tensor

        ours, theirs = _cache_layers(self._cache), _cache_layers(cache)
        old, new = self._mask.shape[1], mask.shape[1]
        for mine, other in zip(ours, theirs, strict=True):
            mine.keys = torch.cat([pad(mine.keys, old), pad(other.keys, new)])
            mine.values = torch.cat([pad(mine.values, old), pad(other.values, new)])
        self._mask = torch.cat([nn.functional.pad(self._mask, (width - old, 0)),
                                nn.functional.pad(mask, (width - new, 0))])

    def _drop_finished(self) -> None:
        """Rows that finished, failed or whose client went away leave the batch."""
        gone = {row.request for row in self._rows if row.request.cancelled and not row.done and not row.request.failed}
        self.stats["cancelled"] += len(gone)
        self._drop([row for row in self._rows if not row.done and not row.request.cancelled])

    def _drop(self, keep: list[_Row]) -> None:
        """Keep only the rows `keep` (in batch order); cut leading columns that only padding holds now."""
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask, self._last = [], None, None, None
            return
        kept = set(keep)
        index = torch.tensor([i for i, row in enumerate(self._rows) if row in kept], device=self.device)
        mask = self._mask[index]
        start = int((mask.sum(0) > 0).nonzero()[0])  # the first column some row still uses
        for layer in _cache_layers(self._cache):
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._mask, self._last = mask[:, start:], self._last[index]
        self._rows = [row for row in self._rows if row in kept]

    def _step(self) -> None:
        """One decode step for every running row, each under its own task."""
        tasks = [row.request.task for row in self._rows]
        positions = self._mask.sum(1, keepdim=True)  # (B, 1): each row's real entries = its next position
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        with self.model._rows_routed(tasks) as distinct:
            # the base model itself: the prompt / prefix components' input rewriting was done at the prefill
            output = self.model.base_model(input_ids=self._last[:, None], attention_mask=self._mask,
                                           position_ids=positions, cache=self._cache, use_cache=True)
        self._cache = output.cache
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += len(distinct) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(self._rows))
        self.stats["max_tasks_in_step"] = max(self.stats["max_tasks_in_step"], len(distinct))
        self._last = self._sample(self._rows, output.logits[:, -1].float())
        self._emit_tokens(self._rows, self._last.tolist())

    @staticmethod
    def _sample(rows: list[_Row], logits: torch.Tensor) -> torch.Tensor:
        """(B,) next tokens: argmax for greedy rows; temperature, then nucleus (top_p: the smallest set of tokens
        whose probability reaches top_p; Holtzman et al. 2020 §3.1), drawn with the row's own generator."""
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is None:
                continue
            sampling = row.request.sampling
            probabilities = (logits[i] / sampling.temperature).softmax(-1)
            if sampling.top_p < 1:
                sorted_probabilities, order = probabilities.sort(descending=True)
                before = sorted_probabilities.cumsum(0) - sorted_probabilities  # mass of the tokens ranked higher
                sorted_probabilities[before >= sampling.top_p] = 0
                probabilities = torch.zeros_like(probabilities).scatter_(0, order, sorted_probabilities)
            tokens[i] = torch.multinomial(probabilities, 1, generator=row.generator)[0]
        return tokens

    def _emit_tokens(self, rows: list[_Row], tokens: list[int]) -> None:
        """Record each row's new token; hand new text to the client; finish rows that are done."""
        self.stats["tokens"] += len(rows)
        for row, token in zip(rows, tokens, strict=True):
            sampling = row.request.sampling
            row.tokens.append(token)
            finish = None
            if token in self.stop_ids and not sampling.ignore_eos:
                finish, text = "stop", self._text(row.tokens[:-1])
            else:
                text = self._text(row.tokens)
                cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
                if cut >= 0:
                    finish, text = "stop", text[:cut]
                elif len(row.tokens) >= sampling.max_tokens:
                    finish = "length"
            end = len(text) if finish else len(text) - _held_back(text, sampling.stop)
            if end > row.sent:
                self._send(row.request, Event(row.index, text[row.sent : end]))
                row.sent = end
            if finish:
                row.done = True
                row.request.running -= 1
                self.stats["finished"] += 1
                self._send(row.request, Event(row.index, finish_reason=finish, completion_tokens=len(row.tokens)))

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _send(self, request: Request, event: Event) -> None:
        try:
            request.emit(event)
        except Exception:  # noqa: BLE001 - a client whose loop is gone: its rows leave
            request.cancelled = True

    def _fail(self, request: Request, error: BaseException) -> None:
        self.stats["failed"] += 1
        request.failed = request.cancelled = True  # its rows leave at the next _drop
        self._send(request, Event(error=error))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _cache_layers(cache) -> list:
    """The per-layer key/value holders of a DynamicCache; refused for caches the padding here would break."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        raise DeltaTuneError(f"this model's key/value cache ({type(cache).__name__}: "
                             f"{sorted({type(layer).__name__ for layer in layers or []})}) is not a plain "
                             f"DynamicCache; continuous batching supports full-attention decoders (GPT-2, Llama...)")
    return layers


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters to keep from the client for now: an unfinished UTF-8 character (decoded as
    U+FFFD), or the start of a stop string that the next tokens may complete."""
    held = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    return held


def _virtual_tokens(model: DeltaModel, task: str) -> int:
    """Positions a task's delta takes before the prompt: prompt tuning's virtual tokens, prefix tuning's prefix."""
    count = 0
    for component in model.components().values():
        if task not in component.tasks:
            continue
        if hasattr(component, "prompt_embeddings"):
            count += component.prompt_embeddings[task].shape[0]
        elif hasattr(component, "prefix_key_values"):
            count += component.prefixes(task).shape[-2]
    return count
