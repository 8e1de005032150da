"""The written-out Llama decode step alone: the fused C kernels (serving/cpu_kernels.c) against PyTorch's operators.

    python benchmarks/written_step.py [--precision bf16|fp32] [--rows 16] [--context 64] [--prompt 0] [--rounds 30]

SmolLM2-135M-Instruct (real weights) with every linear layer prepacked as `deltatune serve` packs them, `--rows` rows
with a `--context`-token cache prefilled (lengths differing by up to 4: left padding), one decode step over them (with
`--prompt N`: a prompt of N tokens joining inside it), the cache cut back after each step so that every step sees the
same shapes. The two steps alternate, the order flipping each round, on the same weights and cache; medians of
wall time per step and the median of per-pair ratios; then the largest difference of their logits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deltatune.models import load_model  # noqa: E402
from deltatune.serving import cpu_kernels  # noqa: E402
from deltatune.serving.llama_step import LlamaDecodeStep  # noqa: E402
from deltatune.serving.packed_linear import pack_linear_layers  # noqa: E402


def step_function(step: LlamaDecodeStep, rows: int, context: int, prompt: int):
    """A closure running `step` once over `rows` prefilled rows (and a joining prompt), then cutting the cache back."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 10_000, (context - index % 5,), generator=generator) for index in range(rows)]
    joining = [torch.randint(100, 10_000, (prompt,), generator=generator)] if prompt else []
    cache = step.empty_cache(rows + 1, 256)
    empty = torch.zeros(0, 1, dtype=torch.long)
    with torch.inference_mode():
        cache.reserve(left=context, right=0)
        step(empty, torch.zeros(0, 0, dtype=torch.long), empty, cache, prompts)
    cache.joined(rows, context)
    mask = torch.zeros(rows, context, dtype=torch.long)
    for row, ids in enumerate(prompts):
        mask[row, context - len(ids):] = 1
    positions, mask = mask.sum(1, keepdim=True), torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    last = torch.arange(rows)[:, None] * 37 + 500

    def one() -> torch.Tensor:
        with torch.inference_mode():
            cache.reserve(left=max(0, prompt - cache.width - 1), right=1)
            logits = step(last, mask, positions, cache, joining)
            for layer in cache.layers:  # back to the context (the joining prompt's slot is overwritten next time)
                layer.end -= 1
        return logits
    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=0, help="a prompt of this many tokens joins inside each step")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    if kernels is None:
        sys.exit(f"no fused kernels here: {cpu_kernels.unavailable_reason()}")
    model = load_model("smollm2", "causal-lm").to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    pack_linear_layers(model.eval(), args.rows)
    steps = {"operators": step_function(LlamaDecodeStep(model), args.rows, args.context, args.prompt),
             "fused": step_function(LlamaDecodeStep(model, kernels=kernels), args.rows, args.context, args.prompt)}
    for one in steps.values():
        for _ in range(3):
            one()
    times = {name: [] for name in steps}
    for round_number in range(args.rounds):
        for name in steps if round_number % 2 else list(steps)[::-1]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    logits = {name: one().float() for name, one in steps.items()}
    ratio = statistics.median(a / b for a, b in zip(times["operators"], times["fused"], strict=True))
    print(f"{args.precision}, {args.rows} rows over {args.context} positions"
          + (f", a {args.prompt}-token prompt joining" if args.prompt else "") + ", "
          + ", ".join(f"{name} {statistics.median(values) * 1e3:.1f} ms" for name, values in times.items())
          + f"; operators / fused per pair {ratio:.2f}x; logits' largest difference "
          f"{(logits['operators'] - logits['fused']).abs().max().item():.3g}, the same argmax on "
          f"{int((logits['operators'].argmax(-1) == logits['fused'].argmax(-1)).sum())} of {logits['fused'].shape[0]}")


if __name__ == "__main__":
    main()
