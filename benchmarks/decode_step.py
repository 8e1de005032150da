"""One continuous-batching decode step (what `deltatune serve --kind generation` runs per token) per delta layout.

    OMP_NUM_THREADS=1 python benchmarks/decode_step.py [--rows 16] [--context 64] [--tasks 8] [--rounds 30]

SmolLM2-135M-Instruct (real weights), `--rows` sequences with a `--context`-token KV cache each, one new token
per row, the step `DecodeLoop._step` runs: `base_model(input_ids=(B, 1), attention_mask, position_ids, cache)`
inside `_rows_routed(tasks)`. Variants, interleaved round by round (order rotating), medians of this process's
CPU time and of wall time:
- base: no delta (= one task merged into the weights: the ceiling the serving benchmark compares with);
- lora, one task: every row under one unmerged LoRA (r=8, alpha=16, q and v);
- lora, mixed: the rows spread over `--tasks` LoRA tasks (ranks 8 and 16 alternating), as serve_generate's load;
- adapter, one task / adapter, mixed / prompt, mixed: Houlsby adapters (bottleneck 64), every row under one task
  and spread over the tasks / prompt tuning (20 tokens; the prompt is in the cache already: the base model runs);
- adapter-lin-one / adapter-lin-mixed: Lin et al.'s adapters (one per block, own LayerNorm per task, bottleneck 64);
- adapter-mixed-N: the Houlsby rows spread over N tasks instead (how the step grows with the tasks it reads).
Adapters cannot be merged: for them one task is the ceiling a mixed step is compared with.
The cache is cut back to its context length after every step, so each step sees the same shapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mixed_batch import interleaved_times  # noqa: E402

import deltatune  # noqa: E402
from deltatune.models import load_model  # noqa: E402
from deltatune.serving.packed_linear import PackedLinear, pack_output_layer  # noqa: E402


def with_tasks(configs: list, seed: int = 0) -> deltatune.DeltaModel:
    """SmolLM2 with one task per config (`task0`, `task1`, ...), every trained value random and non-zero."""
    model = None
    for index, config in enumerate(configs):
        model = deltatune.attach(model or load_model("smollm2", "causal-lm"), config, task=f"task{index}")
        generator = torch.Generator().manual_seed(seed + index)
        with torch.no_grad():
            for tensor in model.task_parameters(f"task{index}").values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


def step_function(model, tasks: list[str] | None, rows: int, context: int, slots: bool = False):
    """A closure running one decode step of `rows` rows over a `context`-token cache, then cutting it back.
    `model`: a DeltaModel with `tasks` (one per row), or a plain transformers model with tasks None. `slots`: the
    serving loop's preallocated `SlotCache` (written in place) instead of transformers' DynamicCache (concatenated)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10_000, (rows, context), generator=generator)
    base = model if tasks is None else model.base_model
    with torch.inference_mode():
        cache = base(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True).cache
        if slots:
            from deltatune.serving.slot_cache import SlotCache

            prefill, cache = cache, SlotCache.like(cache, rows, capacity=2 * context)
            cache.append(prefill)
    last = torch.randint(100, 10_000, (rows, 1), generator=generator)
    mask = torch.ones(rows, context + 1, dtype=torch.long)
    positions = torch.full((rows, 1), context)

    def step() -> torch.Tensor:
        if slots:
            cache.reserve(right=1)
        if tasks is None:
            logits = model(input_ids=last, attention_mask=mask, position_ids=positions, cache=cache,
                           use_cache=True).logits
        else:
            with model._rows_routed(tasks):
                logits = model.base_model(input_ids=last, attention_mask=mask, position_ids=positions,
                                          cache=cache, use_cache=True).logits
        cache.crop(-1)  # the new token out again
        return logits

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--variants", default="base,lora-one,lora-mixed,adapter-one,adapter-mixed,prompt-mixed",
                        help="of those and base-slots, lora-mixed-slots (the serving loop's SlotCache), base-packed "
                             "(slots and the prepacked LM head: what serve runs), base-packed-all (every linear "
                             "prepacked), adapter-lin-one, adapter-lin-mixed, adapter-mixed-N (over N tasks)")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, deltatune {deltatune.__version__}, {torch.get_num_threads()} thread(s), "
          f"{platform.machine()}, load average {os.getloadavg()[0]:.2f} at start; {args.rows} rows, context "
          f"{args.context}, {args.tasks} tasks")
    spread = [f"task{i % args.tasks}" for i in range(args.rows)]
    wanted = args.variants.split(",")
    variants = {}
    if "base" in wanted:
        variants["base (= merged)"] = step_function(load_model("smollm2", "causal-lm"), None, args.rows, args.context)
    if "base-slots" in wanted:
        variants["base, slot cache"] = step_function(load_model("smollm2", "causal-lm"), None, args.rows,
                                                     args.context, slots=True)
    if "base-packed" in wanted:  # what `deltatune serve` runs in fp32 on a CPU: slot cache, prepacked LM head
        model = load_model("smollm2", "causal-lm")
        pack_output_layer(model, args.rows)
        variants["base, slots, packed head"] = step_function(model, None, args.rows, args.context, slots=True)
    if "base-packed-all" in wanted:  # every linear layer prepacked (not what serve does: measured to decide)
        model = load_model("smollm2", "causal-lm")
        for layer in list(model.modules()):
            for child_name, child in list(layer.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(layer, child_name, PackedLinear(child, args.rows))
        variants["base, slots, every linear packed"] = step_function(model, None, args.rows, args.context, slots=True)
    if "lora-mixed-slots" in wanted:
        configs = [deltatune.LoRA(r=8 if i % 2 == 0 else 16, alpha=16) for i in range(args.tasks)]
        variants[f"lora, mixed over {args.tasks}, slots"] = step_function(with_tasks(configs), spread, args.rows,
                                                                          args.context, slots=True)
    if "lora-one" in wanted:
        variants["lora, one task unmerged"] = step_function(
            with_tasks([deltatune.LoRA(r=8, alpha=16)]), ["task0"] * args.rows, args.rows, args.context)
    if "lora-mixed" in wanted:
        configs = [deltatune.LoRA(r=8 if i % 2 == 0 else 16, alpha=16) for i in range(args.tasks)]
        variants[f"lora, mixed over {args.tasks}"] = step_function(with_tasks(configs), spread, args.rows,
                                                                   args.context)
    if "adapter-one" in wanted:
        variants["adapter, one task"] = step_function(
            with_tasks([deltatune.Adapter(bottleneck=64)]), ["task0"] * args.rows, args.rows, args.context)
    if "adapter-mixed" in wanted:
        variants[f"adapter, mixed over {args.tasks}"] = step_function(
            with_tasks([deltatune.Adapter(bottleneck=64)] * args.tasks), spread, args.rows, args.context)
    for count in (int(name.rpartition("-")[2]) for name in wanted if name.startswith("adapter-mixed-")):
        variants[f"adapter, mixed over {count}"] = step_function(  # the same rows over fewer tasks
            with_tasks([deltatune.Adapter(bottleneck=64)] * count), [f"task{i % count}" for i in range(args.rows)],
            args.rows, args.context)
    if "adapter-lin-one" in wanted:
        variants["adapter lin, one task"] = step_function(
            with_tasks([deltatune.Adapter(bottleneck=64, placement="lin")]), ["task0"] * args.rows, args.rows,
            args.context)
    if "adapter-lin-mixed" in wanted:
        variants[f"adapter lin, mixed over {args.tasks}"] = step_function(
            with_tasks([deltatune.Adapter(bottleneck=64, placement="lin")] * args.tasks), spread, args.rows,
            args.context)
    if "prompt-mixed" in wanted:
        variants[f"prompt, mixed over {args.tasks}"] = step_function(
            with_tasks([deltatune.PromptTuning(length=20)] * args.tasks), spread, args.rows, args.context)
    wall, cpu = interleaved_times(variants, args.rounds)
    for label, times in (("cpu", cpu), ("wall", wall)):
        median = {name: statistics.median(values) for name, values in times.items()}
        reference = next(iter(median.values()))
        print(f"\n{label + ' ms per step':<30} {'median':>8} {'vs first':>9}  IQR")
        for name, values in times.items():
            low, _, high = statistics.quantiles(values, n=4)
            print(f"{name:<30} {1e3 * median[name]:>8.1f} {median[name] / reference:>8.2f}x  "
                  f"{1e3 * low:.1f}-{1e3 * high:.1f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
