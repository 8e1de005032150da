"""Continuous batching for generation: one decode loop, many requests, each row decoding under its own delta.

Iteration-level scheduling (Yu et al. 2022, Orca §3.1): requests join and leave the running batch between
two decode steps instead of waiting for a whole batch to finish. S-LoRA (Sheng et al. 2023) and Punica (Chen
et al. 2023) batch rows of different LoRA adapters in one forward pass; here every method whose rows can share a
pass does (those with `mixes_in_decode` in methods/registry.py; the others are refused by name when loaded),
through the per-row routing of `DeltaModel` (`task_state.per_example`, read by each component's mixed path).

One thread runs the model (or several: `--decode-loops`, below). Between two decode steps it:
 1. runs control calls (loading or removing a delta) and drops cancelled requests;
 2. admits waiting requests while rows are free (`max_batch_size`) and runs one chunk of their prefill: the
    requests admitted together are prefilled TOGETHER, left-padded to one width, each row under its own task
    (positions counted over its real tokens, as transformers' left-padded `generate` numbers them), at most
    `prefill_tokens` prompt tokens per pass, so a long prompt is split into chunks with decode steps of the
    running rows between them (chunked prefill: Agrawal et al. 2024, Sarathi-Serve §4). A request whose task puts
    tokens before the prompt (prompt tuning's virtual tokens, prefix tuning's prefix) is prefilled alone by the
    model's own forward (`model(..., tasks=[task])`), as in `DeltaModel.generate`. After the last chunk each
    choice's first token is sampled and its rows join the batch. Where the written-out step runs (below), a
    request of one choice whose prompt fits in `prefill_tokens` skips that pass: its prompt is prefilled INSIDE
    the next decode step (`--prefill-in-step`), its tokens beside the running rows' in every product, so the
    weights are read once for both (vLLM schedules decode and prefill tokens in one batch the same way);
 3. runs one forward pass over the last token of every running row, each row under its own task (for Llama-style
    decoders the step written out, `deltatune.serving.llama_step`: the forward's operators, bit-identical logits);
 4. samples each row's next token; rows that reach an end-of-sequence token, a stop string or `max_tokens`
    leave at once, and so do rows whose client went away.

`--decode-loops N` runs N such loops on one model (the command's default: two on a CPU in fp32), each on its own thread
with its own batch (a `_Lane`: at most its share of `max_batch_size` rows) and its share of the intra-op threads,
all admitting from one queue. Each loop routes its rows through its own `TaskState` route (`own_route`). A control
call (loading or removing a delta) runs once every loop is between two passes. On this project's 2-core CPU
(docs/results/vs_vllm.md) two one-thread loops served 8 mixed LoRAs at 1.15x and 8 mixed DoRA/(IA)³/adapter/prompt
deltas at 1.30x the tokens/s of one two-thread loop, the base model at 0.98x: a mixed step's many small products
leave a second OpenMP thread waiting at every barrier, while two loops keep both cores busy. The loops share the
GIL between operators; two one-thread server processes measured 1.6x (8 LoRAs) and 1.2x (base) instead.

The batch's keys and values live in a `SlotCache` (`deltatune.serving.slot_cache`): one preallocated buffer per
layer with a slot per row, rows left-padded to a common width with a (B, L) attention mask of ones on real entries,
so every row writes its next token into the same column and nothing is copied per step (transformers'
`DynamicCache` concatenates, copying the whole cache of every layer at every step). A joining row is written
right-aligned; a leaving row's slot is refilled with the last row; leading columns left holding only padding are
cut. Each row's next position is its count of real entries (its virtual tokens or prefix included): the position
it has when generated alone.
"""

from __future__ import annotations

import collections
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from deltatune.core.component import BASE_TASK
from deltatune.delta import DeltaModel
from deltatune.errors import DeltaTuneError, LimitError, ShuttingDown, UnknownTaskError
from deltatune.evaluate import stop_token_ids
from deltatune.methods.prompt import position_limit
from deltatune.serving import cpu_kernels
from deltatune.serving.config import ServeConfig
from deltatune.serving.llama_step import LlamaDecodeStep
from deltatune.serving.slot_cache import SlotCache
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


class _Prefill:
    """Requests prefilled together: their prompts left-padded to one width (`ids`, `mask` (b, L)); each row's
    positions count its real tokens (as transformers' left-padded `generate` numbers them). `done`: the columns
    prefilled so far, into `cache` (a DynamicCache of b rows). `whole`: one request whose task puts virtual tokens
    or a prefix before its prompt: prefilled in one pass by the model's own forward."""

    def __init__(self, requests: list[Request], device: torch.device, whole: bool = False):
        self.requests, self.whole = requests, whole
        self.rows = sum(request.sampling.n for request in requests)
        width = max(len(request.prompt_ids) for request in requests)
        self.ids = torch.tensor([[0] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests], device=device)
        self.mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in requests],
                                 device=device)
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.cache = None
        self.done = 0


@dataclass(eq=False)
class _Row:
    request: Request
    index: int  # the choice
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the text handed to the client
    done: bool = False
    last: float = 0.0  # time.monotonic() of its last token (the inter-token latency of /metrics)


class DecodeLoop(ModelWorker):
    """A causal LM with its deltas, its tokenizer and the thread that alone runs them (see the module doc)."""

    thread_name = "deltatune-decode-loop"
    mixes = "mixes_in_decode"  # refuses (by the registry's list) deltas whose rows cannot decode beside others
    mixes_phrase = "decode in a batch with other tasks"

    def __init__(self, model: DeltaModel, tokenizer, config: ServeConfig | None = None):
        config = config or ServeConfig(kind="generation")
        self.stop_ids = set(stop_token_ids(model, tokenizer))
        self.positions = position_limit(model.config)
        self._waiting: collections.deque[Request] = collections.deque()
        loops = min(config.decode_loops or _auto_loops(model), config.max_batch_size)
        share, extra = divmod(config.max_batch_size, loops)  # max_batch_size rows split as evenly as it goes
        self._lanes = [_Lane(self, share + (number < extra)) for number in range(loops)]
        self._threads_per_loop = max(1, torch.get_num_threads() // loops) if loops > 1 else None
        self._controlling = False  # a loop runs control calls: the others wait before their next pass
        on_cpu = next(model.parameters()).device.type == "cpu"
        kernels = cpu_kernels.load() if config.fused_kernels and on_cpu else None
        self._written_step = (LlamaDecodeStep.for_model(model.base_model, model.task_state, kernels)
                              if config.written_step else None)
        self._in_pass = 0  # loops between taking their work and finishing their pass
        super().__init__(model, tokenizer, config, stat_keys=(
            "requests", "rejected", "cancelled", "failed", "finished", "steps", "written_steps", "fused_steps",
            "mixed_steps", "prefill_passes", "prefilled_in_step", "tokens", "max_rows", "max_tasks_in_step"))

    def _threads(self) -> list[threading.Thread]:
        return [threading.Thread(target=self._run, args=(lane,), daemon=True,
                                 name=self.thread_name + (f"-{number}" if len(self._lanes) > 1 else ""))
                for number, lane in enumerate(self._lanes)]

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
            self._admit(len(self._waiting))
            self._waiting.append(request)
            self.stats["requests"] += 1
            self.prometheus.requests.labels(task).inc()
            self.cache.used(task)
            self.prometheus.prompt_tokens.labels(task).inc(len(prompt_ids))
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
        rows = max(lane.capacity for lane in self._lanes)
        if sampling.n > rows:
            split = f" split over {len(self._lanes)} --decode-loops" if len(self._lanes) > 1 else ""
            raise LimitError(f"n={sampling.n} choices cannot decode together in a batch of {rows} rows "
                             f"(--max-batch-size {config.max_batch_size}{split})")
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
        running = sum(len(lane.rows) for lane in self._lanes)
        return {**self.stats, "queue": waiting, "running": running, "tasks": len(self._tasks),
                "decode_loops": len(self._lanes)}

    def _running_and_waiting(self) -> tuple[list[str], list[str]]:
        with self._condition:
            waiting = [request.task or BASE_TASK for request in self._waiting]
        running = set()
        for lane in self._lanes:
            prefilling = [request for group in list(lane.prefills) for request in group.requests] + list(lane.joining)
            running |= {row.request for row in list(lane.rows) if not row.done} | set(prefilling)
        return [request.task or BASE_TASK for request in running], waiting

    # ---- deltas (on a decode thread while the others wait, or before they start) ------------------------------
    def _remove(self, name: str) -> None:
        self.model.remove_task(name)
        for lane in self._lanes:
            lane.leave_task(name)
        self._refresh_tasks()

    def _task_entry(self, name: str, info: dict[str, Any]) -> dict[str, Any]:
        return {"method": info["method"], "path": info.get("path"), "prompt_format": info.get("prompt_format"),
                "virtual_tokens": _virtual_tokens(self.model, name)}

    # ---- the loops ---------------------------------------------------------------------------------------
    def _run(self, lane: _Lane) -> None:
        if self._threads_per_loop is not None:  # this thread's OpenMP team (and MKL's, which is process-wide)
            torch.set_num_threads(self._threads_per_loop)
        with torch.inference_mode(), self.model.task_state.own_route():
            while True:
                admitted, controls = self._next_work(lane)
                if admitted is None:
                    break
                try:
                    for control in controls:
                        self._run_control(*control)
                    lane.prefills += self._prefill_groups(admitted, lane)
                    if lane.prefills:
                        lane.prefill_chunk(lane.prefills[0])
                    joining = []
                    try:
                        lane.drop_finished()
                        joining = lane.take_joining()
                        if lane.rows or joining:
                            lane.step(joining)
                    except Exception as error:  # noqa: BLE001 - every running request fails, the loop goes on
                        for request in {row.request for row in lane.rows} | set(joining):
                            self._fail(request, error)
                        lane.drop([])
                    self._release_memory()
                finally:
                    with self._condition:
                        self._in_pass -= 1
                        if controls:
                            self._controlling = False
                        self._condition.notify_all()
        waiting = {request for group in lane.prefills for request in group.requests} | set(lane.joining)
        running = {row.request for row in lane.rows if not row.done}  # a finished request is answered already
        with self._condition:  # the first loop to stop answers the queue
            queued = set(self._waiting)
            self._waiting.clear()
        for request in running | waiting | queued:
            self._fail(request, ShuttingDown("the server is shutting down"))

    def _next_work(self, lane: _Lane) -> tuple[list[Request] | None, list]:
        """(requests `lane` admits now, control calls to run first); waits while there is nothing to do, and while
        another loop runs control calls. Control calls are taken once no other loop is in a pass (they change the
        model). (None, []): closing."""
        with self._condition:
            controls = []
            while True:
                if self._closing:
                    return None, []
                if self._controlling:
                    self._condition.wait()
                    continue
                if self._control:
                    self._controlling = True
                    while self._in_pass:
                        self._condition.wait()
                    controls = list(self._control)
                    self._control.clear()
                    break
                if lane.rows or lane.prefills or (self._waiting and lane.free() > 0):
                    break
                self._condition.wait()
            admitted, free = [], lane.free()
            while self._waiting and (self._waiting[0].cancelled or self._waiting[0].sampling.n <= free):
                request = self._waiting.popleft()
                if request.cancelled:
                    self.stats["cancelled"] += 1
                    continue
                admitted.append(request)
                free -= request.sampling.n
            self._in_pass += 1
            return admitted, controls

    def _prefill_groups(self, requests: list[Request], lane: _Lane) -> list[_Prefill]:
        """The admitted requests as prefill groups: all whose task puts nothing before the prompt in ONE
        left-padded group (decoded in chunks); a prompt- or prefix-tuning request alone (its virtual tokens or
        prefix come first, as in `DeltaModel.generate`). Where the written-out step runs (`--prefill-in-step`),
        a plain request of one choice whose prompt fits in one pass joins `lane.joining` instead: prefilled inside
        the next decode step."""
        plain, groups = [], []
        in_step = (bool(requests) and self.config.prefill_in_step and self._written_step is not None
                   and self._written_step.applies())
        for request in requests:
            if request.task is not None and request.task not in self.model.task_info:
                self._fail(request, UnknownTaskError(f"task {request.task!r} was removed while this request waited"))
            elif request.task is not None and _virtual_tokens(self.model, request.task):
                groups.append(_Prefill([request], self.device, whole=True))
            elif in_step and request.sampling.n == 1 and len(request.prompt_ids) <= self.config.prefill_tokens:
                lane.joining.append(request)
            else:
                plain.append(request)
        return ([_Prefill(plain, self.device)] if plain else []) + groups

    def decode_step(self, input_ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor,
                    cache: SlotCache, prompts: list[torch.Tensor] = ()) -> torch.Tensor:
        """Logits (B, 1, V) of one token per row: the written-out step for Llama-style decoders where it applies
        (`deltatune.serving.llama_step`, the same operators without the forward's machinery; `--no-written-step`
        turns it off), else the model's own forward. `prompts` (joining requests' token ids, prefilled inside the
        step; their last tokens' logits follow the rows'): the written-out step only, which `_prefill_groups`
        checked applies in this pass."""
        if prompts or (self._written_step is not None and self._written_step.applies()):
            logits = self._written_step(input_ids, mask, positions, cache, prompts)
            self.stats["written_steps"] += input_ids.shape[0] > 0
            self.stats["fused_steps"] += input_ids.shape[0] > 0 and self._written_step.fused
            return logits
        return self.model.base_model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                                     use_cache=True).logits

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
        now = time.monotonic()
        for row, token in zip(rows, tokens, strict=True):
            sampling = row.request.sampling
            row.tokens.append(token)
            self._count_token(row, now)
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

    def _count_token(self, row: _Row, now: float) -> None:
        """/metrics: the row's token under its task, its latency since the last one (or since its request came)."""
        metrics = self.prometheus
        metrics.generation_tokens.labels(row.request.task or BASE_TASK).inc()
        if len(row.tokens) > 1:
            metrics.inter_token.observe(now - row.last)
        elif row.index == 0:  # the request's first token (its choices share the prefill)
            metrics.time_to_first_token.observe(now - row.request.arrived)
        row.last = now

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


class _Lane:
    """One decode loop's batch: its running rows (at most `capacity`), their keys and values, the requests it is
    prefilling; run only by its own thread (or by the thread running control calls while it waits)."""

    def __init__(self, loop: DecodeLoop, capacity: int):
        self.loop, self.capacity = loop, capacity
        self.rows: list[_Row] = []
        self.cache: SlotCache | None = None  # the running rows' keys and values, one slot per row
        self.prefills: list[_Prefill] = []  # admitted requests whose prompts are being prefilled, oldest first
        self.joining: list[Request] = []  # admitted requests to prefill inside the next decode steps, oldest first
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 on real cache entries
        self.last: torch.Tensor | None = None  # (B,) the token each row feeds next

    def free(self) -> int:
        """Rows it can still admit: its capacity less its running rows and those of the prompts it prefills."""
        return self.capacity - len(self.rows) - sum(group.rows for group in self.prefills) - len(self.joining)

    def leave_task(self, name: str) -> None:
        """The task was removed: its running and prefilling requests fail, their rows leave."""
        leaving = [row for row in self.rows if row.request.task == name]
        prefilling = [request for group in self.prefills for request in group.requests if request.task == name]
        prefilling += [request for request in self.joining if request.task == name]
        self.joining = [request for request in self.joining if request.task != name]
        for request in {row.request for row in leaving} | set(prefilling):
            self.loop._fail(request, UnknownTaskError(f"task {name!r} was removed while this request ran"))
        self.prefills = [group for group in self.prefills if not (group.whole and group.requests[0].failed)]
        self.drop([row for row in self.rows if row.request.task != name])

    def prefill_chunk(self, group: _Prefill) -> None:
        """Run the next chunk of `group`'s prompts (at most --prefill-tokens tokens over its rows, so the running
        rows decode between two chunks: chunked prefill, Agrawal et al. 2024 §4 (Sarathi)); the last chunk
        samples each choice's first token and moves the rows into the running batch."""
        try:
            if group.whole:  # the model's own forward: prompt tuning prepends its virtual tokens, prefix tuning
                request = group.requests[0]  # starts from its prefixes
                output = self.loop.model(input_ids=group.ids, attention_mask=group.mask,
                                         tasks=[request.task or BASE_TASK], use_cache=True, logits_to_keep=1)
                group.cache, group.done = output.cache, group.ids.shape[1]
            else:
                step = max(1, self.loop.config.prefill_tokens // len(group.requests))
                start, end = group.done, min(group.done + step, group.ids.shape[1])
                tasks = [None if request.failed else request.task for request in group.requests]  # removed: base
                with self.loop.model._rows_routed(tasks):  # no input rewriting: no task here has virtual tokens
                    output = self.loop.model.base_model(
                        input_ids=group.ids[:, start:end], attention_mask=group.mask[:, :end],
                        position_ids=group.positions[:, start:end], cache=group.cache, use_cache=True,
                        logits_to_keep=1)
                group.cache, group.done = output.cache, end
            self.loop.stats["prefill_passes"] += 1
            if group.done < group.ids.shape[1]:
                return
            self.prefills.remove(group)
            self.join(group, output.logits[:, -1].float())
        except Exception as error:  # noqa: BLE001 - e.g. a prompt that does not fit beside its prompt-tuning prompt
            if group in self.prefills:
                self.prefills.remove(group)
            for request in group.requests:
                self.loop._fail(request, error)

    def join(self, group: _Prefill, logits: torch.Tensor) -> None:
        """Sample each choice's first token from the prompt's last logits (b, V), splice the rows' caches in."""
        counts = [request.sampling.n for request in group.requests]
        rows = _new_rows(group.requests)
        cache, mask = group.cache, group.mask if not group.whole else None
        layers = _cache_layers(cache)
        if mask is None:  # the virtual tokens or prefix are in the cache too
            mask = torch.ones(1, layers[0].keys.shape[-2], dtype=torch.long, device=self.loop.device)
        if len(rows) > len(counts):  # n > 1: each choice its own copy of its prompt's cache
            index = torch.repeat_interleave(torch.arange(len(counts), device=self.loop.device),
                                            torch.tensor(counts, device=self.loop.device))
            for layer in layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
            mask, logits = mask[index], logits[index]
        if self.cache is None:
            self.cache = SlotCache.like(cache, self.capacity)
        self.cache.append(cache)
        self._add_rows(group.requests, rows, logits, mask)

    def _add_rows(self, requests: list[Request], rows: list[_Row], logits: torch.Tensor, mask: torch.Tensor) -> None:
        """New rows (their keys and values in the cache's slots after the running rows', right-aligned at the
        window's end; `mask` (n, l) marks their real entries) join the batch: each samples its first token from
        its prompt's last logits (n, V)."""
        first = self.loop._sample(rows, logits)
        width = self.cache.width
        old = self.mask if self.rows else mask.new_zeros(0, width)
        self.mask = torch.cat([nn.functional.pad(old, (width - old.shape[1], 0)),
                                nn.functional.pad(mask, (width - mask.shape[1], 0))])
        self.last = torch.cat([self.last, first]) if self.rows else first
        self.rows += rows
        for request in requests:
            request.running = request.sampling.n  # a row per choice
        self.loop._emit_tokens(rows, first.tolist())

    def take_joining(self) -> list[Request]:
        """The joining requests this decode step prefills: the oldest first, at most --prefill-tokens prompt tokens
        together (at least one request)."""
        budget, taken = self.loop.config.prefill_tokens, []
        while self.joining and (not taken or len(self.joining[0].prompt_ids) <= budget):
            request = self.joining.pop(0)
            if request.cancelled:
                self.loop.stats["cancelled"] += 1
                continue
            budget -= len(request.prompt_ids)
            taken.append(request)
        return taken

    def drop_finished(self) -> None:
        """Rows that finished, failed or whose client went away leave the batch."""
        gone = {row.request for row in self.rows if row.request.cancelled and not row.done and not row.request.failed}
        self.loop.stats["cancelled"] += len(gone)
        self.drop([row for row in self.rows if not row.done and not row.request.cancelled])

    def drop(self, keep: list[_Row]) -> None:
        """Keep only the rows `keep`: each leaving row's slot is taken by a kept row from the end of the batch (one
        row copied per leaving row); leading columns that only padding holds now are cut."""
        if len(keep) == len(self.rows):
            return
        kept = set(keep)
        count = len(kept)
        holes = [i for i in range(count) if self.rows[i] not in kept]
        movers = [i for i in range(count, len(self.rows)) if self.rows[i] in kept]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        if not order:
            self.cache.keep([])
            self.rows, self.mask, self.last = [], None, None
            return
        index = torch.tensor(order, device=self.loop.device)
        mask = self.mask[index]
        cut = int((mask.sum(0) > 0).nonzero()[0])  # the first column some row still uses
        self.cache.keep(order, cut)
        self.mask, self.last = mask[:, cut:], self.last[index]
        self.rows = [self.rows[i] for i in order]

    def step(self, joining: list[Request] = ()) -> None:
        """One decode step for every running row, each under its own task; `joining`: requests whose prompts are
        prefilled inside it (`LlamaDecodeStep`: their tokens beside the rows', each under its own task), whose rows
        join the batch after it with their first tokens."""
        stats, device, running = self.loop.stats, self.loop.device, len(self.rows)
        prompts = [torch.tensor(request.prompt_ids, device=device) for request in joining]
        longest = max((len(prompt) for prompt in prompts), default=0)
        tasks = [row.request.task for row in self.rows]
        tasks += [request.task for request in joining for _ in request.prompt_ids]
        if self.cache is None:
            self.cache = self.loop._written_step.empty_cache(self.capacity)
        if running:
            positions = self.mask.sum(1, keepdim=True)  # (B, 1): each row's real entries = its next position
            self.mask = torch.cat([self.mask, self.mask.new_ones(running, 1)], dim=1)
            last = self.last[:, None]
        else:
            positions = last = torch.zeros(0, 1, dtype=torch.long, device=device)
        with self.loop.model._rows_routed(tasks) as distinct:
            # the base model itself: the prompt / prefix components' input rewriting was done at the prefill
            self.cache.reserve(left=max(0, longest - self.cache.width - (running > 0)), right=int(running > 0))
            logits = self.loop.decode_step(last, self.mask, positions, self.cache, prompts)
        logits = logits[:, -1].float()
        if running:
            stats["steps"] += 1
            stats["mixed_steps"] += len(distinct) > 1
            stats["max_rows"] = max(stats["max_rows"], running)
            stats["max_tasks_in_step"] = max(stats["max_tasks_in_step"], len(distinct))
            self.loop.prometheus.batch_size.observe(running)
            self.last = self.loop._sample(self.rows, logits[:running])
            self.loop._emit_tokens(self.rows, self.last.tolist())
        if joining:
            stats["prefilled_in_step"] += len(joining)
            self.cache.joined(len(joining), longest)
            mask = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
            for row, prompt in enumerate(prompts):
                mask[row, longest - len(prompt) :] = 1
            self._add_rows(joining, _new_rows(joining), logits[running:], mask)


def _new_rows(requests: list[Request]) -> list[_Row]:
    """A row per choice of each request, with its own generator when sampled (seed + choice)."""
    rows = []
    for request in requests:
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(62)
        rows += [_Row(request, i, None if request.sampling.temperature == 0
                      else torch.Generator(device="cpu").manual_seed(seed + i)) for i in range(request.sampling.n)]
    return rows


AUTO_LOOPS_MAX = 2  # the loops share the GIL between operators: more than two is unmeasured (2-core machine)


def _auto_loops(model: DeltaModel) -> int:
    """`--decode-loops 0`: on a CPU in fp32 two loops where there are two intra-op threads or more (the threads split
    between them), else one; in bf16 or on a GPU one. fp32 products at a decode step's few rows are compute-bound:
    two one-thread loops kept both cores busy (2-core AVX2 CPU: mixed deltas 1.15-1.3x; 2-core Xeon with AMX: the base
    model 1.9x one two-thread loop). bf16 products with native bf16 math are bound by reading the weights, which each
    loop does once per step: one loop of all the rows on both threads served the base model at 1.29-1.34x and 8
    mixed LoRAs at 1.06-1.13x the tokens/s of two (docs/results/vs_vllm.md)."""
    parameter = next(model.base_model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return 1
    return min(AUTO_LOOPS_MAX, torch.get_num_threads())


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
