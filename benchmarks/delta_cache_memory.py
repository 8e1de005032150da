"""The memory of a `deltatune serve` process that loads 100 deltas over HTTP, bounded and unbounded.

    PYTHONPATH=$PWD python benchmarks/delta_cache_memory.py --deltas 100 --bound 8

Makes one LoRA delta (r 8 on every attention and MLP projection: the registry's default targets) of the model and
copies it under a delta root as d000..d099, starts `deltatune serve --allow-loading --delta-root ROOT` once with
`--max-loaded-deltas BOUND` and once without a bound (each its own process, `server_process.py`), and loads the
deltas one after the other with vLLM's `POST /v1/load_lora_adapter`, each followed by a one-token completion under
it. Prints the server's resident memory (VmRSS, /proc) after every `--every` loads, its peak (VmHWM), the deltas
loaded and evicted (/stats) at the end, and one request for the first delta (evicted long ago: loaded again).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_process import memory_mib, start_server  # noqa: E402


def make_deltas(model: str, root: Path, count: int) -> None:
    import torch

    import deltatune
    from deltatune.models import load_model

    delta = deltatune.attach(load_model(model, "causal-lm"), deltatune.LoRA(r=8), task="cached")
    with torch.no_grad():  # B = 0 at initialisation: a delta that changes the output
        for tensor in delta.task_parameters("cached").values():
            tensor.normal_(0, 0.01)
    first = delta.save_delta(root / "d000")
    for index in range(1, count):
        shutil.copytree(first, root / f"d{index:03d}")


def run(model: str, root: Path, count: int, bound: int, every: int) -> dict:
    arguments = ["--model", model, "--kind", "generation", "--allow-loading", "--delta-root", str(root),
                 "--max-loaded-deltas", str(bound), "--precision", "fp32"]
    server, url = start_server(arguments, {})
    rows = []
    try:
        with httpx.Client(base_url=url, timeout=300) as http:
            start = time.monotonic()
            rows.append({"loaded": 0, "rss_mib": memory_mib(server.pid)["VmRSS"]})
            for index in range(count):
                name = f"d{index:03d}"
                answer = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name})
                answer.raise_for_status()
                http.post("/v1/completions", json={"model": name, "prompt": "name[Aromi]", "max_tokens": 1,
                                                   "temperature": 0}).raise_for_status()
                if (index + 1) % every == 0:
                    rows.append({"loaded": index + 1, "rss_mib": memory_mib(server.pid)["VmRSS"]})
            seconds = time.monotonic() - start
            again = http.post("/v1/completions", json={"model": "d000", "prompt": "name[Aromi]", "max_tokens": 1,
                                                       "temperature": 0})
            stats = http.get("/stats").json()
            memory = memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    return {"bound": bound, "rows": rows, "peak_mib": memory["VmHWM"], "final_mib": memory["VmRSS"],
            "tasks_loaded": stats["tasks"], "evicted": stats["evicted"], "reloaded": stats["reloaded"],
            "first_delta_again": again.status_code, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--deltas", type=int, default=100)
    parser.add_argument("--bound", type=int, default=8, help="--max-loaded-deltas of the bounded run")
    parser.add_argument("--every", type=int, default=10, help="measure after this many loads")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_deltas(args.model, root, args.deltas)
        size = sum(f.stat().st_size for f in (root / "d000").iterdir()) / 2**20
        print(f"{args.deltas} deltas of {size:.2f} MiB each (LoRA r 8) under {root}", flush=True)
        for bound in (args.bound, 0):
            result = run(args.model, root, args.deltas, bound, args.every)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
