"""Where a `deltatune serve` process spends its CPU under vs_vllm.py's load: tokens/s and each thread's user and
system time and page faults (from /proc), for this checkout's server or the commit before (`--before`).

    python benchmarks/serve_threads.py today                       # the base model, no delta loaded
    python benchmarks/serve_threads.py today --deltas              # the base model, vs_vllm.py's 16 deltas loaded
    python benchmarks/serve_threads.py today --serve-args=--packed-head
    python benchmarks/serve_threads.py today --threads 1 --env GOMP_SPINCOUNT=20000000
    python benchmarks/serve_threads.py today --deltas --tasks lora0,lora1,lora2,lora3,lora4,lora5,lora6,lora7
    python benchmarks/serve_threads.py before                      # deltatune at --before (git worktree)

Run the variants alternately, several rounds each: on the shared 2-vCPU machine one server's rate moves by 10-15%
from run to run. What it found is in docs/results/vs_vllm.md (the prepacked head and loaded deltas leave the second
OpenMP thread idle).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_vllm  # noqa: E402


def thread_times(pid: int) -> dict[str, tuple[int, float, float]]:
    """Each thread's (minor faults, user s, system s) so far."""
    threads, ticks = {}, os.sysconf("SC_CLK_TCK")
    for thread in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{thread}/stat").read_text().rsplit(")", 1)[1].split()
        threads[thread] = (int(fields[7]), int(fields[11]) / ticks, int(fields[12]) / ticks)
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("which", choices=["today", "before"])
    parser.add_argument("--deltas", action="store_true", help="load vs_vllm.py's 8 LoRA and 8 other deltas")
    parser.add_argument("--serve-args", default="", help="more `deltatune serve` options, space-separated")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server's environment")
    parser.add_argument("--tasks", default="base", help="comma-separated: the requests cycle over them (with "
                                                         "--deltas: lora0..lora7, dora0, ia30, adapter0, prompt0, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--before", default="d297be7")
    parser.add_argument("--work", default=str(vs_vllm.ROOT / "runs" / "vs_vllm"))
    parser.add_argument("--data-dir", default=os.environ.get("DELTATUNE_DATA", str(vs_vllm.ROOT.parent / "shared" /
                                                                                  "data")))
    args = parser.parse_args()
    for item in args.env:
        name, value = item.split("=", 1)
        os.environ[name] = value
    from deltatune.tasks import get_task
    from deltatune.tasks.generation import generation_prompt

    prompts = [generation_prompt(e["source"]) for e in get_task("e2e").load("test", args.data_dir)]
    served = {}
    if args.deltas:
        made = vs_vllm.make_deltas(Path(args.work))
        served = {**made["lora"], **made["mixed"]}
    server, url = vs_vllm.start_deltatune("fp32", served, args, before=args.which == "before",
                                          extra=tuple(args.serve_args.split()))
    try:
        tasks = args.tasks.split(",")
        vs_vllm.warm_up(url, prompts, tasks, args)
        start = thread_times(server.pid)
        cell = asyncio.run(vs_vllm.drive(url, prompts, tasks, args))
        end = thread_times(server.pid)
    finally:
        vs_vllm.stop(server)
    print(f"{args.which} {' '.join(sys.argv[2:])}: {cell['tokens_per_s']:.1f} tok/s, {cell['seconds']:.1f} s, TTFT p50 "
          f"{cell['ttft_p50']:.2f} s, inter-token p50 {cell['itl_p50']:.3f} s")
    busiest = sorted(end, key=lambda t: -(end[t][1] - start.get(t, (0, 0, 0))[1]))[:3]
    for thread in busiest:
        faults, user, system = (a - b for a, b in zip(end[thread], start.get(thread, (0, 0, 0)), strict=True))
        print(f"  thread {thread}: user {user:.1f} s, system {system:.1f} s, minor faults {faults}")


if __name__ == "__main__":
    main()
