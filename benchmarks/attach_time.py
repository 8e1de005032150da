"""Time to attach each method (its defaults) to a real model: MiniLM (BERT) and SmolLM2 (Llama).

`attach` finds the modules a method acts on (targets.py) and wraps or hooks them; this measures it alone:
the model is loaded once, each run attaches to a fresh deep copy (the copy is not timed). Median and
spread of --runs runs, in ms.

    python benchmarks/attach_time.py [--models minilm,smollm2] [--methods lora,adapter,...] [--runs 7] [--as-unknown]

`--as-unknown` renames each model's type (`config.model_type = "unknown-<type>"`), so that no table of
targets.py answers and every method finds its modules from the model's structure (discovery's cost).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

import deltatune
from deltatune.methods.registry import METHODS
from deltatune.models import load_model


def attach_ms(model: torch.nn.Module, config, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        fresh = copy.deepcopy(model)
        start = time.perf_counter()
        deltatune.attach(fresh, config, task="t")
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,smollm2")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--as-unknown", action="store_true", help="hide the model type from the tables")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {}
    for name in args.models.split(","):
        model = load_model(name, "classification", num_labels=2)
        if args.as_unknown:
            model.config.model_type = f"unknown-{model.config.model_type}"
        for method in args.methods.split(","):
            config = METHODS[method].config(**({"add_missing": True} if method == "bitfit" else {}))
            try:
                times = attach_ms(model, config, args.runs)
            except deltatune.DeltaTuneError as error:
                print(f"{name:8s} {method:11s} refused: {str(error)[:100]}")
                continue
            results[f"{name}/{method}"] = times
            print(f"{name:8s} {method:11s} median {statistics.median(times):8.1f} ms  "
                  f"(min {min(times):.1f}, max {max(times):.1f}, {args.runs} runs)", flush=True)
    print(json.dumps({k: round(statistics.median(v), 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
