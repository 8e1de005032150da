"""The generation decode loop without HTTP: vs_vllm.py's load submitted straight to a `DecodeLoop`, variants of the
served model alternated, each run in a fresh process.

    python benchmarks/decode_loop_engine.py                                  # packed / packed apart / unpacked
    python benchmarks/decode_loop_engine.py --variants packed,unpacked --loads base,lora --rounds 2
    python benchmarks/decode_loop_engine.py --loops 1                        # one two-thread loop instead of two

SmolLM2-135M-Instruct in fp32 (or `--precision bf16`), the E2E test MRs as prompts (`generation_prompt`),
`--requests` requests kept `--clients` at a time (each client submits its next request when its last one finished),
at most `--new-tokens` greedy tokens, `--max-batch-size` = `--clients` split over `--loops` decode loops. Loads:
`base` (no delta), `lora` (vs_vllm.py's 8 LoRA deltas, request i under lora(i mod 8)), `mixed` (its 8
DoRA/(IA)³/adapter/prompt deltas).
Variants (the serving options `deltatune serve` sets with `--packed-linears` / `--no-packed-linears`):
- packed: every linear layer prepacked for oneDNN, q/k/v and gate/up as one weight each (`pack_linear_layers`);
- packed-apart: every linear layer prepacked, each on its own (no `FusedSiblings`);
- packed-forward: packed, each decode step the model's own forward instead of the written-out Llama step
  (`--no-written-step`, serving/llama_step.py);
- prefill-passes: packed, every prompt prefilled in a pass of its own (`--no-prefill-in-step`) instead of inside
  the next decode step;
- unfused: packed, the written step running PyTorch's operators between the products (`--no-fused-kernels`) instead
  of the fused C kernels (serving/cpu_kernels.c);
- unpacked: `F.linear` on the plain weights.

Without the HTTP server, the client and the text streaming, the rates show the engine alone; the order of the
variants rotates each round, as this shared 2-vCPU machine's speed drifts by 10-20% within minutes: read ratios
within a round. The deltas are vs_vllm.py's (`--work`; it makes them once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("packed", "packed-apart", "packed-forward", "prefill-passes", "unfused", "unpacked")


def one_run(args) -> dict:
    """This process: one variant under one load; the tokens/s and the loop's counters."""
    import torch

    import deltatune.serving.packed_linear as packed_linear
    from deltatune.delta import load_delta
    from deltatune.models import load_tokenizer
    from deltatune.serving.app import served_model
    from deltatune.serving.config import ServeConfig
    from deltatune.serving.decode_loop import DecodeLoop, Sampling
    from deltatune.tasks import get_task
    from deltatune.tasks.generation import generation_prompt

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2")
    if args.variant == "packed-apart":
        packed_linear.FUSABLE_SIBLINGS = ()
    config = ServeConfig(kind="generation", max_batch_size=args.clients, decode_loops=args.loops,
                         precision=args.precision, packed_linears=args.variant != "unpacked",
                         written_step=args.variant != "packed-forward",
                         prefill_in_step=args.variant != "prefill-passes",
                         fused_kernels=args.variant != "unfused")
    model = served_model("smollm2", "causal-lm", config)  # the model as `deltatune serve` builds it
    tasks = ["base"]
    if args.load != "base":
        index = json.loads((Path(args.work) / "deltas.json").read_text())[args.load]
        for name, path in sorted(index.items()):
            model = load_delta(model, path, task=name)
        tasks = sorted(index)
    examples = list(get_task("e2e").load("test", args.data_dir))[: args.requests]
    prompt_ids = [tokenizer(generation_prompt(example["source"])).input_ids for example in examples]
    loop = DecodeLoop(model, tokenizer, config).start()
    lock, finished, tokens, following = threading.Lock(), threading.Semaphore(0), [0], [0]

    def submit_next() -> None:  # a client: its next request once its last one finished
        with lock:
            number = following[0]
            following[0] += 1
        if number >= len(prompt_ids):
            return

        def emit(event) -> None:
            if event.finish_reason or event.error:
                with lock:
                    tokens[0] += event.completion_tokens
                finished.release()
                submit_next()

        loop.submit(tasks[number % len(tasks)], prompt_ids[number], Sampling(max_tokens=args.new_tokens,
                                                                               temperature=0), emit)

    start = time.perf_counter()
    for _ in range(args.clients):
        submit_next()
    for _ in prompt_ids:
        finished.acquire()
    seconds = time.perf_counter() - start
    stats = dict(loop.stats)
    loop.close()
    return {"variant": args.variant, "load": args.load, "tokens": tokens[0], "seconds": seconds,
            "tokens_per_s": tokens[0] / seconds, "steps": stats["steps"], "prefill_passes": stats["prefill_passes"],
            "prefilled_in_step": stats["prefilled_in_step"],
            "failed": stats["failed"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--loads", default="base,lora", help="comma-separated, of: base, lora, mixed")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loops", type=int, default=2, help="decode loops (one OpenMP thread each when 2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="the served weights' dtype (bf16: native bf16 math wanted, AVX512-BF16 or AMX)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", default=str(ROOT / "runs" / "vs_vllm"), help="vs_vllm.py's deltas (deltas.json)")
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", str(ROOT.parent / "shared" / "data")))
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "decode_loop_engine.md"))
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # one run, in a child process
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(one_run(args)))
        return
    variants, loads = args.variants.split(","), args.loads.split(",")
    if loads != ["base"] and not (Path(args.work) / "deltas.json").exists():
        sys.exit(f"no deltas under {args.work}: run benchmarks/vs_vllm.py --quick once (it makes them)")
    started, wall = time.strftime("%Y-%m-%d %H:%M", time.gmtime()), time.perf_counter()
    runs = []
    for round_number in range(args.rounds):
        for load in loads:
            shift = round_number % len(variants)
            for variant in variants[shift:] + variants[:shift]:  # the order rotates each round
                command = [sys.executable, __file__, "--variant", variant, "--load", load,
                           *[f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                             if name not in ("variant", "load", "variants", "loads", "rounds", "out")]]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True,
                                                   env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.splitlines()[-1])
                result["round"] = round_number + 1
                runs.append(result)
                print(f"round {round_number + 1} | {load:5s} | {variant:13s} | {result['tokens_per_s']:6.1f} tok/s | "
                      f"{result['tokens']} tokens | {result['steps']} steps | {result['prefill_passes']} prefills",
                      flush=True)
    write(runs, variants, loads, args, started, time.perf_counter() - wall)


def write(runs: list[dict], variants: list[str], loads: list[str], args, started: str, wall: float) -> None:
    import torch

    def rate(load: str, variant: str, round_number: int) -> float:
        return next(r["tokens_per_s"] for r in runs
                    if (r["load"], r["variant"], r["round"]) == (load, variant, round_number))

    first = variants[0]
    lines = ["# The decode loop without HTTP (`benchmarks/decode_loop_engine.py`)", "",
             f"Run {started} UTC, {wall / 60:.0f} min: `python benchmarks/decode_loop_engine.py --variants "
             f"{args.variants} --loads {args.loads} --rounds {args.rounds} --loops {args.loops} "
             f"--precision {args.precision}`; {platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__}. "
             f"{args.requests} requests, {args.clients} at a time, at most {args.new_tokens} greedy tokens, "
             f"{args.precision}, {args.loops} decode loop(s), "
             f"{args.threads} threads; each run a fresh process, the variants' order rotating each round.", "",
             "| load | round | " + " | ".join(variants) + " | " + " | ".join(f"{first} / {v}" for v in variants[1:])
             + " |", "|---|---:|" + "---:|" * (2 * len(variants) - 1)]
    for load in loads:
        for round_number in range(1, args.rounds + 1):
            rates = [rate(load, variant, round_number) for variant in variants]
            lines.append(f"| {load} | {round_number} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                         + " | ".join(f"{rates[0] / r:.2f}x" for r in rates[1:]) + " |")
        ratios = [statistics.median(rate(load, first, n) / rate(load, v, n) for n in range(1, args.rounds + 1))
                  for v in variants[1:]]
        lines.append(f"| {load} | median | | " + " | " * (len(variants) - 1)
                     + " | ".join(f"**{r:.2f}x**" for r in ratios) + " |")
    lines += ["", "Tokens/s of completion tokens over the run's wall time; completion tokens of each load's runs "
              "(greedy: equal in fp32; in bf16 a row's rounding depends on the rows beside it): "
              + ", ".join(f"{load} {sorted({r['tokens'] for r in runs if r['load'] == load})}" for load in loads)
              + "."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
