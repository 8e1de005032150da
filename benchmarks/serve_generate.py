"""Generation serving: `deltatune serve` on SmolLM2-135M, concurrent streaming clients, many deltas in one batch.

    python benchmarks/serve_generate.py                                   # the issue's load: hours on 2 CPUs
    python benchmarks/serve_generate.py --requests 32 --baseline-requests 8 --threads 2   # what the results ran

Each scenario starts its own server (`deltatune serve --kind generation`, a subprocess with --threads torch
threads) and sends `--requests` streamed completions from `--clients` concurrent clients (one event loop, httpx,
server-sent events parsed by hand: the official client costs more CPU than the server on a 2-core machine):
  lora          8 LoRA deltas (ranks 8 and 16 alternating), each request for the next of the 8 tasks in turn
  merged        the first LoRA delta merged into the weights, served as the base model: the ceiling
  one-at-a-time the lora load with --max-batch-size 1: requests decode one after another
  adapter       8 Houlsby adapter deltas (bottleneck 64), requests spread over them
  prompt        8 prompt-tuning deltas (20 virtual tokens), requests spread over them
  tiny          8 LoRA deltas on a tiny random Llama (2 layers, width 32) and `--tiny-requests` requests of 16 new
                tokens: the server's own memory over thousands of requests (rows, caches, streams), in minutes
Deltas are random, not trained (LoRA's B != 0, every other value random and non-zero): a trained delta costs the
same compute. Prompts: E2E test meaning representations as the E2E deltas see them ("MR\\nSentence:"); every
request generates exactly `--new-tokens` tokens (temperature 0, `ignore_eos`). Reported per scenario: completion
tokens/s over the measured run, time to first token (sending -> first text chunk) and inter-token latency (gaps
between text chunks) at p50/p99, and the server's resident memory (/proc: peak VmHWM, and VmRSS over the run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import httpx  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from server_process import memory_mib, start_server  # noqa: E402

import deltatune  # noqa: E402
from deltatune.models import load_model, load_tokenizer, resolve_model_path  # noqa: E402

DELTAS = 8


def method_config(method: str, index: int):
    if method == "lora":
        rank = 8 if index % 2 == 0 else 16
        return deltatune.LoRA(r=rank, alpha=2 * rank)
    if method == "adapter":
        return deltatune.Adapter(bottleneck=64)
    return deltatune.PromptTuning(length=20)


def make_deltas(method: str, folder: Path, model_name: str = "smollm2") -> dict[str, Path]:
    """DELTAS random deltas of `method` on the model, saved under `folder`."""
    model = load_model(model_name, "causal-lm")
    paths = {}
    for index in range(DELTAS):
        task = f"{method}{index}"
        torch.manual_seed(index)
        model = deltatune.attach(model, method_config(method, index), task=task)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for name, tensor in model.task_parameters(task).items():
                if method != "prompt":  # prompts start from random embeddings already
                    tensor.add_(torch.randn(tensor.shape, generator=generator) * (0.01 if "lora" in name else 0.02))
        paths[task] = model.save_delta(folder / task, task=task)
    return paths


def tiny_folder(folder: Path) -> Path:
    from deltatune.testing import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tiny_model("llama", "causal-lm").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def merged_model(delta: Path, folder: Path) -> Path:
    """SmolLM2 with `delta` merged into its weights, saved as a model folder."""
    model = deltatune.load_delta(load_model("smollm2", "causal-lm"), delta)
    model.merge_and_unload().save_pretrained(folder)
    load_tokenizer("smollm2").save_pretrained(folder)
    return folder


async def load(url: str, prompts: list[str], tasks: list[str], requests: int, clients: int, new_tokens: int):
    """(seconds, completion tokens, TTFTs, inter-token gaps, errors) of `requests` streamed completions."""
    ttfts: list[float] = []
    gaps: list[float] = []
    errors: list[str] = []
    tokens = 0
    issued = 0

    async def one(http: httpx.AsyncClient, number: int) -> None:
        nonlocal tokens
        body = {"model": tasks[number % len(tasks)], "prompt": prompts[number % len(prompts)],
                "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        sent = time.perf_counter()
        last = None
        async with http.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                errors.append(f"{response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens += chunk["usage"]["completion_tokens"]
                if not chunk.get("choices") or not chunk["choices"][0]["text"]:
                    continue
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - sent)
                else:
                    gaps.append(now - last)
                last = now

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal issued
        while issued < requests:
            issued += 1
            await one(http, issued - 1)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        metrics = (await http.get("/stats")).json()
    return elapsed, tokens, ttfts, gaps, errors, metrics


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def run_scenario(name: str, model: str, deltas: dict[str, Path], tasks: list[str], settings: list[str],
                 prompts: list[str], requests: int, args, new_tokens: int | None = None) -> dict:
    server, url = start_server(["--model", model, "--kind", "generation", *settings], deltas, args.threads)
    try:
        asyncio.run(load(url, prompts, tasks, min(4, requests), min(4, args.clients), 4))  # warm-up
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.25):
                samples.append(memory_mib(server.pid)["VmRSS"])

        sampler = threading.Thread(target=sample, daemon=True)
        start_rss = memory_mib(server.pid)["VmRSS"]
        sampler.start()
        elapsed, tokens, ttfts, gaps, errors, metrics = asyncio.run(
            load(url, prompts, tasks, requests, args.clients, new_tokens or args.new_tokens))
        stop.set()
        sampler.join()
        end = memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result = {"scenario": name, "requests": requests, "seconds": elapsed, "tokens": tokens,
              "tokens_per_s": tokens / elapsed, "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
              "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99), "rss_start_mib": start_rss,
              "rss_end_mib": end["VmRSS"], "rss_peak_mib": end["VmHWM"], "errors": errors,
              "rss_quarters_mib": [samples[len(samples) * q // 4] for q in (1, 2, 3)] if samples else [],
              "steps": metrics["steps"], "mixed_steps": metrics["mixed_steps"], "max_rows": metrics["max_rows"]}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batched scenario")
    parser.add_argument("--baseline-requests", type=int, default=200, help="requests of the one-at-a-time run")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--tiny-requests", type=int, default=2000, help="requests of the tiny-model memory run")
    parser.add_argument("--scenarios", default="lora,merged,one-at-a-time,adapter,prompt")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()

    from deltatune.tasks import get_task
    from deltatune.tasks.generation import generation_prompt

    started = time.time()
    load_before = os.getloadavg()
    prompts = [generation_prompt(e["source"]) for e in get_task("e2e").load("test", args.data_dir)]
    wanted = args.scenarios.split(",")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        lora = make_deltas("lora", folder / "lora") if {"lora", "merged", "one-at-a-time"} & set(wanted) else {}
        smollm2 = resolve_model_path("smollm2")
        batch = ["--max-batch-size", str(args.clients)]
        for name in wanted:
            if name == "lora":
                results.append(run_scenario(name, smollm2, lora, list(lora), batch, prompts, args.requests, args))
            elif name == "merged":
                merged = merged_model(lora["lora0"], folder / "merged")
                results.append(run_scenario(name, str(merged), {}, ["base"], batch, prompts, args.requests, args))
            elif name == "tiny":
                model = tiny_folder(folder / "tiny")
                deltas = make_deltas("lora", folder / "tiny-lora", str(model))
                short = [prompt[:60] + "\nSentence:" for prompt in prompts]  # the tiny model has 128 positions
                results.append(run_scenario(name, str(model), deltas, list(deltas), batch, short, args.tiny_requests,
                                            args, new_tokens=16))
            elif name == "one-at-a-time":
                results.append(run_scenario(name, smollm2, lora, list(lora), ["--max-batch-size", "1"], prompts,
                                            args.baseline_requests, args))
            else:
                deltas = make_deltas(name, folder / name)
                results.append(run_scenario(name, smollm2, deltas, list(deltas), batch, prompts, args.requests, args))
    rates = {r["scenario"]: r["tokens_per_s"] for r in results if r["scenario"] != "tiny"}
    summary = {
        "command": " ".join(sys.argv), "torch": torch.__version__, "deltatune": deltatune.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "wall_seconds": time.time() - started, "results": results,
        "ratios": {f"{name} / merged": rates[name] / rates["merged"] for name in rates if "merged" in rates}
        | {f"{name} / one-at-a-time": rates[name] / rates["one-at-a-time"] for name in rates
           if "one-at-a-time" in rates},
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
