"""`deltatune compare --jobs`: wall time of one many-cell comparison run serially (1 cell x all cores' threads,
what compare did before --jobs) and in parallel (N single-thread cells), and whether the cells agree.

    python benchmarks/compare_jobs.py [--model minilm] [--tasks rte,mrpc] [--methods lora,bitfit] [--seeds 2]
                                      [--budget steps=20] [--train-limit 640] [--eval-limit 200] [--jobs 2]
                                      [--out runs/bench-compare-jobs]

Each setting runs into its own fresh folder (no reused cells), with --no-latency. Prints the wall times, the
speedup, the machine's load average before each run (other work on the machine slows both) and, per cell, the
final metrics of both runs (the same up to float summation order: the thread count differs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from deltatune.cli import main as cli_main


def run(args: argparse.Namespace, jobs: int, threads: int) -> tuple[float, dict, tuple[float, ...]]:
    out = Path(args.out) / f"jobs{jobs}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    load = os.getloadavg()
    started = time.perf_counter()
    code = cli_main(["compare", "--model", args.model, "--tasks", args.tasks, "--methods", args.methods,
                     "--seeds", str(args.seeds), "--budget", args.budget, "--train-limit", str(args.train_limit),
                     "--eval-limit", str(args.eval_limit), "--no-latency", "--published", "none",
                     "--jobs", str(jobs), "--threads-per-job", str(threads), "--out", str(out)])
    seconds = time.perf_counter() - started
    assert code == 0, f"compare --jobs {jobs} failed"
    return seconds, json.loads((out / "results.json").read_text())["cells"], load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tasks", default="rte,mrpc")
    parser.add_argument("--methods", default="lora,bitfit")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--budget", default="steps=20")
    parser.add_argument("--train-limit", type=int, default=640)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="runs/bench-compare-jobs")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    serial, serial_cells, serial_load = run(args, jobs=1, threads=cores)
    parallel, parallel_cells, parallel_load = run(args, jobs=args.jobs, threads=max(1, cores // args.jobs))
    print(f"\n{len(serial_cells)} cells, {cores} cores")
    print(f"--jobs 1 x {cores} threads: {serial:.0f} s (load average before: {serial_load[0]:.1f})")
    print(f"--jobs {args.jobs} x {max(1, cores // args.jobs)} threads: {parallel:.0f} s "
          f"(load average before: {parallel_load[0]:.1f})")
    print(f"speedup: {serial / parallel:.2f}x\n\n| cell | --jobs 1 | --jobs {args.jobs} |\n|---|---|---|")
    for name, cell in serial_cells.items():
        print(f"| {name} | {cell['summary']['final']} | {parallel_cells[name]['summary']['final']} |")


if __name__ == "__main__":
    main()
