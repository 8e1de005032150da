"""What a user waits for: wall time to a target SST-2 dev accuracy, `deltatune train` vs Trainer + peft.

    python benchmarks/time_to_accuracy.py [--seeds 0] [--target 0.86] [--eval-every 100]
                                          [--side-by-side | --one-at-a-time] [--out runs/tta]
                                          [-- extra deltatune train arguments]

MiniLM-L6 + LoRA r=8 (alpha 16) on query/value, SST-2 train -> GLUE dev, lr 5e-4, batch 32, linear schedule,
6% warmup, weight decay 0.01, one epoch, dynamic padding, for both runners:
- `deltatune train` with its CLI defaults (precision auto, length bucketing, cheap evaluation);
- `benchmarks/tta_trainer_peft.py`: Hugging Face `Trainer` + `peft`, fp32, as its docs show.
Both evaluate every `--eval-every` steps, so neither is favoured by a finer grid. By default the two runs of a
seed go side by side, one thread each, so both see the same machine load (this machine is shared); with
`--one-at-a-time` each runs alone on `--threads` threads. Prints, per run: the first evaluation at or above
the target (step, wall seconds since training began, evaluations included), best and final accuracy, and
the ratio deltatune / Trainer of the time to target. Each run's settings are saved beside it
(`OUT/<runner>-seed<N>.settings.json`); with `--summarize`, a run made with other settings than the command's
is marked in the table with them and left out of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def commands(seed: int, out: Path, eval_every: int, extra: list[str]) -> dict[str, list[str]]:
    return {
        "trainer+peft": [sys.executable, str(HERE / "tta_trainer_peft.py"), "--seed", str(seed),
                         "--eval-every", str(eval_every), "--out", str(out / f"trainer-seed{seed}")],
        "deltatune": [sys.executable, "-c", "from deltatune.cli import main; main()", "train", "--model", "minilm",
                      "--task", "sst2", "--method", "lora", "--lr", "5e-4", "--batch-size", "32", "--epochs", "1",
                      "--warmup-ratio", "0.06", "--weight-decay", "0.01", "--eval-every", str(eval_every),
                      "--seed", str(seed), "--no-progress", "--out", str(out / f"deltatune-seed{seed}"), *extra],
    }


def launch(command: list[str], threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def read_run(folder: Path, target: float) -> dict:
    evals = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    reached = next((e for e in evals if e["eval"]["accuracy"] >= target), None)
    accuracies = [e["eval"]["accuracy"] for e in evals]
    return {"reached_step": reached and reached["step"], "reached_seconds": reached and reached["seconds"],
            "reached_train_seconds": reached and round(reached["seconds"] - reached["eval_seconds"], 1),
            "best": max(accuracies), "final": accuracies[-1], "epoch_seconds": evals[-1]["seconds"],
            "eval_seconds": evals[-1]["eval_seconds"], "curve": [(e["step"], round(e["eval"]["accuracy"], 4))
                                                                 for e in evals]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--target", type=float, default=0.86)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--runners", default="trainer+peft,deltatune")
    parser.add_argument("--one-at-a-time", action="store_true", help="each run alone on --threads threads")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/tta")
    parser.add_argument("--summarize", action="store_true", help="only print the tables of finished runs in --out")
    parser.add_argument("extra", nargs="*", help="after --: extra `deltatune train` arguments")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runners = args.runners.split(",")
    print(f"# time to {args.target:.0%} SST-2 dev accuracy, MiniLM + LoRA r=8 q,v, lr 5e-4, batch 32, 1 epoch — "
          f"{time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(f"command: {' '.join(['python'] + sys.argv)}")
    mode = f"one at a time, {args.threads} threads" if args.one_at_a_time else "side by side, 1 thread each"
    print(f"mode: {mode}; load average at start {os.getloadavg()[0]:.2f}\n")
    results: dict[str, list[dict]] = {runner: [] for runner in runners}
    for seed in map(int, args.seeds.split(",")):
        cmds = commands(seed, out, args.eval_every, args.extra)
        settings = {runner: {"command": cmds[runner][1:], "mode": mode} for runner in runners}
        started = time.perf_counter()
        if not args.summarize:
            for runner in runners:
                (out / f"{runner}-seed{seed}.settings.json").write_text(json.dumps(settings[runner]) + "\n")
        if args.summarize:
            pass
        elif args.one_at_a_time:
            for runner in runners:
                launch(cmds[runner], args.threads, out / f"{runner}-seed{seed}.log").wait()
        else:
            processes = [launch(cmds[runner], 1, out / f"{runner}-seed{seed}.log") for runner in runners]
            for process in processes:
                process.wait()
        for runner in runners:
            folder = out / f"{runner.split('+')[0]}-seed{seed}"
            run = read_run(folder, args.target)
            saved = out / f"{runner}-seed{seed}.settings.json"
            run["settings"] = json.loads(saved.read_text()) if saved.is_file() else None
            run["same_settings"] = run["settings"] == settings[runner]
            results[runner].append(run)
            print(json.dumps({"seed": seed, "runner": runner, **run}))
        print(f"seed {seed}: {time.perf_counter() - started:.0f} s wall; load average {os.getloadavg()[0]:.2f}\n")

    print(f"| runner | seed | first >= {args.target:.0%} at step | seconds | of which training | best | final "
          f"| epoch s | of which eval |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for runner in runners:
        for seed, run in zip(args.seeds.split(","), results[runner]):
            seed = seed if run["same_settings"] else f"{seed} ‡"
            print(f"| {runner} | {seed} | {run['reached_step'] or 'never'} | {run['reached_seconds'] or '-'} | "
                  f"{run['reached_train_seconds'] or '-'} | {run['best']:.2%} | {run['final']:.2%} | "
                  f"{run['epoch_seconds']:.0f} | {run['eval_seconds']:.0f} |")
    other = [(runner, seed, run["settings"]) for runner in runners
             for seed, run in zip(args.seeds.split(","), results[runner]) if not run["same_settings"]]
    for runner, seed, settings in other:
        print(f"‡ {runner} seed {seed} ran with other settings than this command, left out of the ratios: "
              + (json.dumps(settings) if settings else "settings not recorded"))
    if set(runners) == {"trainer+peft", "deltatune"}:
        both = [(d, t) for d, t in zip(results["deltatune"], results["trainer+peft"])
                if d["same_settings"] and t["same_settings"]]
        pairs = [(d, t) for d, t in both if d["reached_seconds"] and t["reached_seconds"]]
        epochs = [d["epoch_seconds"] / t["epoch_seconds"] for d, t in both]
        if pairs:
            with_evals = statistics.median(d["reached_seconds"] / t["reached_seconds"] for d, t in pairs)
            without = statistics.median(d["reached_seconds"] / t["reached_train_seconds"] for d, t in pairs)
            print(f"\ntime to {args.target:.0%}, deltatune / Trainer+peft: median "
                  f"{with_evals:.2f} over {len(pairs)} seed(s) where both reached it")
            print(f"the same, Trainer's evaluations not counted (deltatune's are): median {without:.2f}")
        if epochs:
            print(f"one epoch, deltatune / Trainer+peft: median {statistics.median(epochs):.2f} over {len(epochs)} "
                  f"seed(s)")


if __name__ == "__main__":
    main()
