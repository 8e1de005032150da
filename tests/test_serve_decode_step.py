"""The generation server's decode step: the preallocated slot cache, batched and chunked prefill, and --precision.

Every row of the decode loop must generate the tokens of its prompt generated ALONE by the eager reference
(`DeltaModel.use(task)` + transformers' `generate`, a DynamicCache, one prompt, no padding), whatever the rows
around it: requests prefilled together (left-padded, in chunks), rows leaving and joining while others run (slots
refilled, the window widened and cut), one method per test over every method whose rows mix in a decode step.
"""

from __future__ import annotations

import threading

import pytest
import torch

import deltatune
from deltatune.errors import DeltaTuneError, LimitError
from deltatune.methods.registry import METHODS
from deltatune.serving.config import ServeConfig
from deltatune.serving.decode_loop import DecodeLoop, Sampling
from deltatune.serving.slot_cache import SlotCache
from deltatune.testing import tiny_model, tiny_tokenizer

GENERATE_MIXABLE = ("lora", "dora", "ia3", "adapter", "bitfit", "prompt", "prefix")
# two tasks of one method per case; Lin et al.'s adapters (own LayerNorm per task): a ReLU one without adapters in
# the lowest block beside a GELU one, bottlenecks of 64 and 6 (zero-padded in the mixed step's stack)
CONFIGS = {"bitfit": [deltatune.BitFit(add_missing=True)] * 2,
           "adapter_lin": [deltatune.Adapter(placement="lin"),
                           deltatune.Adapter(placement="lin", bottleneck=6, activation="relu", skip_layers=1)]}
SETTINGS = {  # ServeConfig fields of each way to run the same requests
    "chunked prefill, 3 slots": {"max_batch_size": 3, "prefill_tokens": 7},
    "whole prompts, 4 slots": {"max_batch_size": 4, "prefill_tokens": 512},
    "one at a time": {"max_batch_size": 1},
    "two decode loops, 3 slots each": {"max_batch_size": 6, "decode_loops": 2, "prefill_tokens": 7},
    "prompts in passes of their own, 4 slots": {"max_batch_size": 4, "prefill_in_step": False},
}
# (task index or None for the base, prompt length, new tokens): lengths differ so that rows leave at different
# steps, later requests join running rows, and a longer prompt widens the window of a running batch
REQUESTS = [(0, 3, 6), (1, 9, 3), (None, 5, 8), (0, 12, 4), (1, 2, 7), (None, 7, 5), (0, 16, 3)]


def model_with(method: str, dtype: torch.dtype = torch.float32) -> deltatune.DeltaModel:
    """The tiny Llama with two tasks of `method` (a case of CONFIGS, else its defaults), every trained value random
    and non-zero."""
    torch.manual_seed(0)
    configs = CONFIGS.get(method) or [METHODS[method].config()] * 2
    model = None
    for index, config in enumerate(configs):
        model = deltatune.attach(model or tiny_model("llama", "causal-lm"), config, task=f"{method}{index}")
        generator = torch.Generator().manual_seed(index + 1)
        with torch.no_grad():
            for tensor in model.task_parameters(f"{method}{index}").values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    model.base_model.generation_config.eos_token_id = None  # the reference runs to max_new_tokens, as ignore_eos
    return model.to(dtype).eval()


class Recording(DecodeLoop):
    """The loop, recording every row's token ids (the HTTP side sees only text)."""

    def __init__(self, *args, **kwargs):
        self.tokens: dict[int, list[int]] = {}
        self.threads: set[str] = set()  # the decode loops that emitted tokens
        super().__init__(*args, **kwargs)

    def _emit_tokens(self, rows, tokens):
        self.threads.add(threading.current_thread().name)
        for row, token in zip(rows, tokens, strict=True):
            self.tokens.setdefault(id(row.request), []).append(token)
        super()._emit_tokens(rows, tokens)


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(5, 200, (length,), generator=generator).tolist() for _, length, _ in REQUESTS]


def served_tokens(model, tasks: list[str | None], settings: dict) -> tuple[list[list[int]], dict]:
    """Every request queued before the loop starts (so the first ones are admitted and prefilled together)."""
    loop = Recording(model, tiny_tokenizer(), ServeConfig(kind="generation", **settings))
    finished = threading.Semaphore(0)
    errors = []

    def emit(event):
        if event.error is not None:
            errors.append(event.error)
        if event.finish_reason or event.error is not None:
            finished.release()

    requests = [loop.submit(task or "base", ids, Sampling(max_tokens=new, temperature=0, ignore_eos=True), emit)
                for task, ids, (_, _, new) in zip(tasks, prompts(), REQUESTS, strict=True)]
    loop.start()
    try:
        for _ in requests:
            assert finished.acquire(timeout=60), "a request did not finish"
    finally:
        loop.close()
    assert not errors, errors
    return [loop.tokens[id(request)] for request in requests], {**loop.metrics(), "threads": len(loop.threads)}


def alone(model, task: str | None, ids: list[int], new: int) -> list[int]:
    """The eager reference: one prompt, its task active, transformers' generate with a DynamicCache."""
    model.use(task)
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new,
                                min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.use(None)
    return output[0, len(ids):].tolist()


def test_the_matrix_covers_every_method_that_mixes_in_a_decode_step():
    refused = {name for name in METHODS if DecodeLoop._refusal(_loop_of(name), f"{name}0", name, "x")}
    assert set(GENERATE_MIXABLE) == set(METHODS) - refused


def _loop_of(method: str) -> DecodeLoop:
    config = CONFIGS[method][0] if method in CONFIGS else METHODS[method].config()
    return DecodeLoop(deltatune.attach(tiny_model("llama", "causal-lm"), config, task=f"{method}0"), tiny_tokenizer())


@pytest.mark.parametrize("method", (*GENERATE_MIXABLE, "adapter_lin"))
def test_slot_cache_decode_equals_eager_decode_alone_for_every_mixable_method(method):
    model = model_with(method)
    tasks = [None if index is None else f"{method}{index}" for index, _, _ in REQUESTS]
    expected = [alone(model, task, ids, new) for task, ids, (_, _, new) in zip(tasks, prompts(), REQUESTS, strict=True)]
    for name, settings in SETTINGS.items():
        got, metrics = served_tokens(model, tasks, settings)
        assert got == expected, (method, name)
        if name.startswith("chunked") and method not in ("prompt", "prefix"):
            assert metrics["prefill_passes"] > 2, "prompts were not chunked"  # the 4 longer than 7 tokens
        if name.startswith("whole") and metrics["written_steps"]:  # a prompt / prefix tuning task's: a pass its own
            own_pass = sum(task is not None for task in tasks) if method in ("prompt", "prefix") else 0
            assert metrics["prefilled_in_step"] == len(REQUESTS) - own_pass, name
        if not settings.get("prefill_in_step", True) or not metrics["written_steps"]:
            assert metrics["prefilled_in_step"] == 0, name
        loops = settings.get("decode_loops", 1)
        assert metrics["max_rows"] == settings["max_batch_size"] // loops, name  # each loop's batch was full
        assert metrics["threads"] == loops, name


def test_the_commands_default_runs_two_loops_on_a_cpu_that_splits_rows_and_threads(monkeypatch):
    """`--decode-loops 0` (the command's default): in fp32 two loops where torch has two threads or more, each with
    its share of --max-batch-size rows and of the threads; one loop on one thread; never more loops than rows; in bf16
    one loop of all the rows on every thread (its products are bound by reading the weights, once per loop)."""
    model = model_with("lora")
    for threads, rows, loops, capacities, per_loop in [(2, 16, 2, [8, 8], 1), (8, 5, 2, [3, 2], 4),
                                                        (1, 16, 1, [16], None), (4, 1, 1, [1], None)]:
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        config = ServeConfig(kind="generation", decode_loops=0, max_batch_size=rows, max_n=64)
        loop = DecodeLoop(model, tiny_tokenizer(), config)
        assert [lane.capacity for lane in loop._lanes] == capacities and loop._threads_per_loop == per_loop
        assert len(loop._workers) == loops
        with pytest.raises(LimitError, match=f"batch of {capacities[0]} rows"):
            loop.check_limits("base", 3, Sampling(n=capacities[0] + 1))
    model.base_model.to(torch.bfloat16)
    loop = DecodeLoop(model, tiny_tokenizer(), ServeConfig(kind="generation", decode_loops=0, max_batch_size=16))
    assert [lane.capacity for lane in loop._lanes] == [16] and loop._threads_per_loop is None


def test_prefill_of_requests_arriving_together_is_one_pass():
    """Seven plain requests within 8 slots: one prefill pass (not seven), the same tokens as one at a time; with
    --prefill-in-step (the written-out step) no pass of their own: the seven prompts ride in the first decode step."""
    model = model_with("lora")
    tasks = [None if index is None else f"lora{index}" for index, _, _ in REQUESTS]
    passes = {"max_batch_size": 8, "prefill_tokens": 4096, "prefill_in_step": False}
    together, metrics = served_tokens(model, tasks, passes)
    one_by_one, single = served_tokens(model, tasks, {"max_batch_size": 1, "prefill_in_step": False})
    in_step, in_step_metrics = served_tokens(model, tasks, {**passes, "prefill_in_step": True})
    assert together == one_by_one == in_step
    assert metrics["prefill_passes"] == 1 and single["prefill_passes"] == len(REQUESTS)
    assert in_step_metrics["prefill_passes"] == 0 and in_step_metrics["prefilled_in_step"] == len(REQUESTS)


def test_slot_cache_moves_rows_and_windows_like_plain_tensors():
    """append / keep / reserve against the same operations on plain (rows, 1, L, 1) tensors, left-padded."""
    from transformers.cache_utils import DynamicCache

    def prefill(values: list[list[float]]) -> DynamicCache:  # rows left-padded with 0 to a common length
        width = max(map(len, values))
        tensor = torch.tensor([[0.0] * (width - len(v)) + v for v in values])[:, None, :, None]
        cache = DynamicCache()
        cache.update(tensor, -tensor, 0)
        return cache

    def rows_of(cache: SlotCache) -> list[list[float]]:
        return cache.layers[0].keys[:, 0, :, 0].tolist()

    cache = SlotCache.like(prefill([[1.0]]), slots=4, capacity=8)
    cache.append(prefill([[1, 2], [3, 4, 5]]))
    assert rows_of(cache) == [[0, 1, 2], [3, 4, 5]]
    cache.reserve(right=1)
    new = torch.tensor([[6.0], [7.0]])[:, None, :, None]
    cache.update(new, -new, 0)
    assert rows_of(cache) == [[0, 1, 2, 6], [3, 4, 5, 7]] and cache.layers[0].buffers[0].shape[2] == 8  # no move
    cache.append(prefill([[8, 9, 10, 11, 12]]))  # longer than the window: widened to the left, buffer doubled
    assert rows_of(cache) == [[0, 0, 1, 2, 6], [0, 3, 4, 5, 7], [8, 9, 10, 11, 12]]
    assert cache.layers[0].buffers[0].shape[2] == 16  # 5 columns needed > half of 8: doubled
    cache.keep([2, 1], cut=1)  # row 0 leaves: the last row takes its slot; the first column held padding only
    assert rows_of(cache) == [[9, 10, 11, 12], [3, 4, 5, 7]]
    assert cache.layers[0].values[:, 0, :, 0].tolist() == [[-9, -10, -11, -12], [-3, -4, -5, -7]]
    for _ in range(20):  # the window slides right; full buffers move it back to column 0
        cache.reserve(right=1)
        cache.update(torch.ones(2, 1, 1, 1), torch.ones(2, 1, 1, 1), 0)
    assert rows_of(cache) == [[9, 10, 11, 12] + [1] * 20, [3, 4, 5, 7] + [1] * 20]
    cache.keep([])
    assert cache.width == 0 and cache.rows == 0


def test_precision_option(monkeypatch):
    from deltatune.serving.app import served_model

    def load_model(name, kind, **options):
        torch.manual_seed(0)  # the same checkpoint every time
        return tiny_model("llama", kind)

    monkeypatch.setattr("deltatune.models.load_model", load_model)
    fp32 = served_model("tiny", "causal-lm", ServeConfig(kind="generation"))
    bf16 = served_model("tiny", "causal-lm", ServeConfig(kind="generation", precision="bf16"))
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.base_identity == fp32.base_identity  # deltas are checked against the checkpoint's own weights
    bf16 = deltatune.attach(bf16, deltatune.LoRA(r=2), task="t")
    assert {p.dtype for p in bf16.task_parameters("t").values()} == {torch.bfloat16}
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = served_model("tiny", "causal-lm", ServeConfig(kind="generation", precision="auto"))
    assert {p.dtype for p in auto.parameters()} == {torch.float32}  # no native bf16 math: fp32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    auto = served_model("tiny", "causal-lm", ServeConfig(kind="generation", precision="auto"))
    assert {p.dtype for p in auto.parameters()} == {torch.bfloat16}
    with pytest.raises(DeltaTuneError, match="precision 'fp16'"):
        ServeConfig(precision="fp16")


@pytest.mark.parametrize("method", ["lora", "adapter_lin"])
def test_bf16_rows_decode_as_bf16_alone(method):
    """At bf16 too, each row's tokens are its prompt's alone (the reference at bf16); adapters' rows grouped by
    task in bf16 (16-byte rows: bottleneck 6 padded to 8)."""
    model = model_with(method, torch.bfloat16)
    tasks = [None if index is None else f"{method}{index}" for index, _, _ in REQUESTS]
    expected = [alone(model, task, ids, new) for task, ids, (_, _, new) in zip(tasks, prompts(), REQUESTS, strict=True)]
    got, _ = served_tokens(model, tasks, SETTINGS["chunked prefill, 3 slots"])
    assert got == expected


def test_requests_waiting_to_join_a_step_fail_when_their_task_is_removed_and_free_their_rows():
    """Admitted requests wait in `joining` for the next decode step; removing one's task fails it (the error event
    names the removal), gives its row back, and leaves the other to be prefilled by the next step."""
    model = model_with("lora")
    loop = DecodeLoop(model, tiny_tokenizer(), ServeConfig(kind="generation", max_batch_size=4))
    lane, events = loop._lanes[0], {"lora0": [], "lora1": []}
    for task in events:
        loop.submit(task, [5, 6, 7], Sampling(max_tokens=2, temperature=0), events[task].append)
    admitted, _ = loop._next_work(lane)
    assert loop._prefill_groups(admitted, lane) == [] and len(lane.joining) == 2 and lane.free() == 2
    lane.leave_task("lora1")
    assert [request.task for request in lane.joining] == ["lora0"] and lane.free() == 3
    assert not events["lora0"] and "was removed while this request ran" in str(events["lora1"][0].error)
    with torch.inference_mode(), model.task_state.own_route():
        lane.step(lane.take_joining())
    assert [(row.request.task, len(row.tokens)) for row in lane.rows] == [("lora0", 1)]
    assert loop.stats["prefilled_in_step"] == 1 and not lane.joining and lane.free() == 3
