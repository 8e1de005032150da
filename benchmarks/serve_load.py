"""Load test of `deltatune serve` on loopback: latency, throughput, errors and the server's memory.

    python benchmarks/serve_load.py                       # 2,000 requests, 16 clients, 4 tasks (~1-2 min)
    python benchmarks/serve_load.py --requests 500 --clients 8

The script makes 4 task deltas on MiniLM (LoRA, BitFit, Houlsby adapter, prompt tuning: random non-zero
values, so that every request of the 4 tasks runs its own delta), starts `deltatune serve` with them as a
subprocess on a free loopback port, warms it up, then runs `--clients` concurrent clients (one event loop,
httpx) that each send requests of one real SST-2 dev sentence for a random task until `--requests` have been
sent (or `--max-seconds` passed). It reports latency percentiles (client side: from sending to the whole
response), throughput, every non-200 status, the server's batching counters (/stats) and the server
process's resident memory (RSS, /proc) after the warm-up, at each quarter of the run, its peak and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import os
import random
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
from deltatune.models import load_model  # noqa: E402

SST2_DEV = ROOT.parent / "shared" / "data" / "glue" / "sst2" / "dev.tsv"
CONFIGS = {"lora": deltatune.LoRA(r=8), "bitfit": deltatune.BitFit(), "adapter": deltatune.Adapter(bottleneck=64),
           "prompt": deltatune.PromptTuning(length=20)}


def sentences() -> list[str]:
    with open(SST2_DEV, newline="") as handle:
        return [row[0] for row in list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]


def make_deltas(folder: Path) -> dict[str, Path]:
    paths = {}
    for index, (task, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(index)
        model = deltatune.attach(load_model("minilm", "classification"), config, task=task)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for tensor in model.task_parameters(task).values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
        paths[task] = model.save_delta(folder / task)
    return paths


async def load(url: str, texts: list[str], tasks: list[str], requests: int, clients: int, max_seconds: float):
    latencies: list[float] = []
    statuses: collections.Counter = collections.Counter()
    sent = 0
    rng = random.Random(0)
    deadline = time.monotonic() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            body = {"task": rng.choice(tasks), "inputs": [rng.choice(texts)]}
            start = time.perf_counter()
            try:
                response = await http.post("/v1/predict", json=body)
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - start
        metrics = (await http.get("/stats")).json()
    return latencies, statuses, elapsed, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long")
    parser.add_argument("--warmup", type=int, default=256, help="requests before the measured run")
    parser.add_argument("--max-batch-size", default="32")
    parser.add_argument("--max-wait-ms", default="5")
    args = parser.parse_args()

    texts = sentences()
    with tempfile.TemporaryDirectory() as folder:
        deltas = make_deltas(Path(folder))
        settings = ["--model", "minilm", "--max-batch-size", args.max_batch_size, "--max-wait-ms", args.max_wait_ms]
        server, url = start_server(settings, deltas, timeout=300)
        try:
            tasks = list(deltas)
            asyncio.run(load(url, texts, tasks, args.warmup, args.clients, 120))  # shapes, pools, caches
            before = memory_mib(server.pid)["VmRSS"]
            samples: list[tuple[float, float]] = []  # (seconds into the run, RSS)
            stop = threading.Event()
            started = time.monotonic()

            def sample() -> None:
                while not stop.wait(0.25):
                    samples.append((time.monotonic() - started, memory_mib(server.pid)["VmRSS"]))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            latencies, statuses, elapsed, metrics = asyncio.run(
                load(url, texts, tasks, args.requests, args.clients, args.max_seconds))
            stop.set()
            sampler.join()
            after = memory_mib(server.pid)["VmRSS"]
        finally:
            server.terminate()
            server.wait(timeout=30)

    done = sum(statuses.values())
    errors = {k: v for k, v in statuses.items() if k != 200}
    quantiles = statistics.quantiles(latencies, n=100)
    print(f"deltatune serve, MiniLM, tasks {', '.join(CONFIGS)} (one delta each); {args.clients} concurrent clients, "
          f"1 SST-2 dev sentence per request; max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs (shared)")
    print(f"requests       {done} in {elapsed:.1f} s: {done / elapsed:.1f} requests/s; "
          f"status 200: {statuses[200]}, errors: {errors or 0}")
    print(f"latency        p50 {1e3 * quantiles[49]:.0f} ms, p90 {1e3 * quantiles[89]:.0f} ms, "
          f"p99 {1e3 * quantiles[98]:.0f} ms, max {1e3 * max(latencies):.0f} ms")
    batches = metrics["batches"]
    print(f"server         {batches} forward passes (warm-up included), {metrics['mixed_batches']} of them mixed "
          f"(>1 task), {metrics['inputs'] / max(batches, 1):.1f} inputs per pass on average, at most "
          f"{metrics['max_batch_inputs']}; rejected (503) {metrics['rejected']}, failed {metrics['failed']}")
    quarters = [next((rss for at, rss in samples if at >= q * elapsed / 4), after) for q in (1, 2, 3)]
    print(f"server RSS     {before:.0f} MiB after the warm-up ({args.warmup} requests); at 1/4, 1/2, 3/4 of the run "
          f"{', '.join(f'{q:.0f}' for q in quarters)} MiB; peak {max((r for _, r in samples), default=after):.0f} MiB; "
          f"{after:.0f} MiB at the end ({after - before:+.0f} MiB)")


if __name__ == "__main__":
    main()
