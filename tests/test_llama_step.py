"""The decode loop's written-out Llama step (`deltatune.serving.llama_step`): bit for bit the logits of the model's own
forward, rows left-padded or not, each row under its own delta; it steps aside where a delta hooks a module whose
forward it replaces; the decode loop runs it and still decodes every row as `generate` does."""

import pytest
import torch
from test_serve_decode_step import served_tokens

import deltatune
from deltatune.serving.llama_step import LlamaDecodeStep
from deltatune.serving.slot_cache import SlotCache
from deltatune.testing import tiny_model, with_random_deltas

METHODS = {"lora": deltatune.LoRA(r=4), "dora": deltatune.DoRA(r=4), "ia3": deltatune.IA3(),
           "bitfit": deltatune.BitFit(add_missing=True), "adapter": deltatune.Adapter(bottleneck=4)}


def with_deltas(methods: dict) -> deltatune.DeltaModel:
    """The tiny Llama (4 query heads, 2 key/value heads) with one randomised delta per method."""
    torch.manual_seed(0)
    return with_random_deltas(tiny_model("llama", "causal-lm"), methods)


def running_rows(model: deltatune.DeltaModel, tasks: list, padding: list[int], slots: int | None = None):
    """Left-padded rows of 9 tokens (`padding[i]` pad tokens in row i), each prefilled under its task into a slot cache
    of `slots` slots (default: one per row): (last tokens (B, 1), the mask with the next column, positions (B, 1),
    the cache with room for the next column), what one decode step takes."""
    base, rows, width = model.base_model, len(tasks), 9
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 500, (rows, width), generator=generator)
    mask = torch.ones(rows, width, dtype=torch.long)
    for row, count in enumerate(padding):
        mask[row, :count] = 0
    with torch.inference_mode():
        with model._rows_routed(tasks):
            prefill = base(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                           use_cache=True).cache
        cache = SlotCache.like(prefill, slots or rows, capacity=16)
        cache.append(prefill)
        positions = mask.sum(1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
        cache.reserve(right=1)
    return ids[:, -1:], mask, positions, cache


def both_steps(model: deltatune.DeltaModel, tasks: list, padding: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's forward, the written step) logits of one decode step over a slot cache of left-padded rows."""
    base = model.base_model
    last, mask, positions, cache = running_rows(model, tasks, padding)
    with torch.inference_mode(), model._rows_routed(tasks):
        forward = base(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True).logits
        cache.crop(-1)
        written = LlamaDecodeStep.for_model(base)
        assert written.applies()
        return forward, written(last, mask, positions, cache)


@pytest.mark.parametrize("padding", [[0, 0, 0, 0, 0, 0], [3, 0, 5, 0, 1, 0]], ids=["no padding", "left-padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_written_step_gives_the_forward_logits_bit_for_bit_per_row_delta(padding, dtype):
    """No padding: attention without a mask (SDPA's grouped-query path); padding: the boolean mask, queries grouped
    per key/value head. Rows under LoRA, DoRA, (IA)³, BitFit, a Houlsby adapter (hooked on o_proj and down_proj, which
    the step calls as modules) and the base model in one step."""
    model = with_deltas(METHODS).to(dtype)
    forward, written = both_steps(model, ["lora", "dora", None, "ia3", "bitfit", "adapter"], padding)
    assert written.dtype == dtype and written.shape == forward.shape
    assert torch.equal(written, forward)
    assert (forward[0] - forward[2]).abs().max() > 1e-3  # the deltas change the logits: the rows were routed


def test_prompts_prefilled_inside_a_step_give_their_own_forwards_logits_and_cache():
    """Two prompts (under LoRA and DoRA) ride in a decode step of six left-padded rows: the rows' logits are the step's
    without them, each prompt's last logits and its keys and values (in its new slot, right-aligned at the window's
    end) are those of the model's forward over that prompt alone, under its task; the window widens to the longest
    prompt and the prompts' rows join after the step (to fp32 rounding: the products have more rows)."""
    model = with_deltas(METHODS)
    base, tasks, padding = model.base_model, ["lora", "dora", None, "ia3", "bitfit", "adapter"], [3, 0, 5, 0, 1, 0]
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 500, (length,), generator=generator) for length in (12, 4)]
    prompt_tasks = ["lora", "dora"]
    forward, _ = both_steps(model, tasks, padding)
    rows = len(tasks)
    last, mask, positions, cache = running_rows(model, tasks, padding, slots=rows + len(prompts))
    with torch.inference_mode():
        cache.reserve(left=12 - (cache.width + 1), right=1)  # the longest prompt's columns end at the new one
        with model._rows_routed(tasks + [task for task, p in zip(prompt_tasks, prompts) for _ in p]):
            logits = LlamaDecodeStep.for_model(base, model.task_state)(last, mask, positions, cache, prompts)
        assert logits.shape[0] == rows + len(prompts) and cache.rows == rows
        torch.testing.assert_close(logits[:rows], forward, rtol=0, atol=1e-5)
        cache.joined(len(prompts), 12)
        assert cache.rows == rows + 2 and cache.width == 12
        for slot, (prompt, task) in enumerate(zip(prompts, prompt_tasks, strict=True), start=rows):
            model.use(task)
            alone = base(input_ids=prompt[None], use_cache=True)
            model.use(None)
            torch.testing.assert_close(logits[slot, -1], alone.logits[0, -1], rtol=0, atol=1e-5)
            for layer, expected in zip(cache.layers, alone.cache.layers, strict=True):
                torch.testing.assert_close(layer.keys[slot, :, 12 - len(prompt):], expected.keys[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(layer.values[slot, :, 12 - len(prompt):], expected.values[0], rtol=0,
                                           atol=1e-5)
        assert (logits[rows] - logits[rows + 1]).abs().max() > 1e-3


def test_written_step_steps_aside_for_hooks_on_the_modules_it_replaces():
    """A hook on a layer, its attention or its MLP (modules whose forward the step replaces) sends the step back to the
    model's forward while it is there. A GPT-2 has no written step; a prompt (two tokens) is refused by name."""
    model = with_deltas({"lora": deltatune.LoRA(r=4)})
    written = LlamaDecodeStep.for_model(model.base_model)
    assert written.applies()
    layer = model.base_model.model.layers[1]
    for module in (layer, layer.self_attn, layer.mlp):
        handle = module.register_forward_hook(lambda *args: None)
        assert not written.applies()
        handle.remove()
        assert written.applies()
    assert LlamaDecodeStep.for_model(tiny_model("gpt2", "causal-lm")) is None
    with pytest.raises(ValueError, match="one token per row, not 2; a prompt goes in `prompts` or through the model"):
        written(torch.ones(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 2), None)


def test_the_decode_loop_runs_the_written_step_and_decodes_as_the_forward_does():
    """Rows of five methods and the base model, mixed in steps: the same greedy tokens with the written step as with
    the model's forward, and the written step ran every decode step (no hook on a replaced module here)."""
    model = with_deltas(METHODS)
    tasks = ["lora", "dora", None, "ia3", "bitfit", "adapter", "lora"]  # one per request of served_tokens' load
    written, written_stats = served_tokens(model, tasks, {"max_batch_size": 4, "written_step": True})
    forward, forward_stats = served_tokens(model, tasks, {"max_batch_size": 4, "written_step": False})
    assert written == forward and all(written)
    assert written_stats["mixed_steps"] > 0 and written_stats["written_steps"] == written_stats["steps"] > 0
    assert forward_stats["written_steps"] == 0 and forward_stats["steps"] > 0
