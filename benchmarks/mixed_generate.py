"""Many generation tasks on one decoder: one mixed-task `generate` vs a loop of `use(task)` + `generate`.

    OMP_NUM_THREADS=1 python benchmarks/mixed_generate.py [--tasks 4] [--rows-per-task 2] [--new-tokens 32]
                                                         [--method lora] [--rounds 3]

SmolLM2-135M-Instruct (real weights), `--tasks` deltas of one method (or "mixed": LoRA, adapters, BitFit
and prompt tuning side by side) with random non-zero values, `--rows-per-task` E2E test MRs per task
(interleaved: row i belongs to task i mod T). Greedy, exactly `--new-tokens` new tokens per row (EOS
suppressed, so both ways do the same work). Variants, interleaved round by round, medians quoted:
- mixed: one `model.generate(input_ids, attention_mask, tasks=[...])` over all rows (left padding, KV cache);
- loop: for each task, `use(task)` then `generate` over its rows (left-padded to their own longest).
Before timing, the mixed tokens are checked equal to the loop's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import deltatune
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task
from deltatune.tasks.encoding import Encoded, collate
from deltatune.tasks.generation import generation_prompt

CONFIGS = {
    "lora": lambda i: deltatune.LoRA(r=8, alpha=16),
    "adapter": lambda i: deltatune.Adapter(bottleneck=64),
    "bitfit": lambda i: deltatune.BitFit(add_missing=True),
    "prompt": lambda i: deltatune.PromptTuning(length=20),
}
MIXED = ["lora", "adapter", "bitfit", "prompt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--rows-per-task", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--method", default="lora", help="lora | adapter | bitfit | prompt | mixed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", "../shared/data"))
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    model = load_model("smollm2", "causal-lm")
    names = [f"task{i}" for i in range(args.tasks)]
    for i, name in enumerate(names):
        method = MIXED[i % len(MIXED)] if args.method == "mixed" else args.method
        model = deltatune.attach(model, CONFIGS[method](i), task=name)
        with torch.no_grad():
            for tensor in model.task_parameters(name).values():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    model.eval()
    sources = [e["source"] for e in get_task("e2e").load("test", args.data_dir)[: args.tasks * args.rows_per_task]]
    prompts = [tokenizer(generation_prompt(s), add_special_tokens=False)["input_ids"] for s in sources]
    tasks = [names[i % args.tasks] for i in range(len(prompts))]
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)

    def batch(indices: list[int]) -> dict:
        return collate([Encoded(prompts[i], None, None) for i in indices], tokenizer.pad_token_id, "left")

    def mixed() -> list[list[int]]:
        inputs = batch(list(range(len(prompts))))
        out = model.generate(**inputs, tasks=tasks, **options)
        return out[:, inputs["input_ids"].shape[1] :].tolist()

    def loop() -> list[list[int]]:
        results: list[list[int]] = [[] for _ in prompts]
        for name in names:
            indices = [i for i, t in enumerate(tasks) if t == name]
            model.use(name)
            inputs = batch(indices)
            out = model.generate(**inputs, **options)
            for row, i in enumerate(indices):
                results[i] = out[row, inputs["input_ids"].shape[1] :].tolist()
        return results

    with torch.no_grad():
        reference, candidate = loop(), mixed()
        equal = sum(a == b for a, b in zip(reference, candidate, strict=True))
        seconds: dict[str, list[float]] = {"mixed": [], "loop": []}
        for _ in range(args.rounds):
            for name, run in [("mixed", mixed), ("loop", loop)]:
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
    rows = len(prompts)
    result = {
        "command": "python benchmarks/mixed_generate.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "data_dir"),
        "torch": torch.__version__, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "threads": torch.get_num_threads(), "rows": rows, "rows_equal_to_loop": f"{equal}/{rows}",
        **{f"{name}_median_s": round(statistics.median(values), 3) for name, values in seconds.items()},
        **{f"{name}_tokens_per_s": round(rows * args.new_tokens / statistics.median(values), 1)
           for name, values in seconds.items()},
    }
    result["speedup"] = round(result["loop_median_s"] / result["mixed_median_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
