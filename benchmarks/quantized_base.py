"""A quantized frozen base (QLoRA's recipe) per precision: weight memory, training memory and step time, accuracy.

    OMP_NUM_THREADS=1 python benchmarks/quantized_base.py [--parts weights,memory,steps,sst2] [--models minilm,smollm2]
                                                          [--rounds 5] [--out runs/quantized_base]

- weights: the bytes of the block linear weights as stored (`quantize.linear_weight_bytes`) per precision, and the
  seconds loading + quantizing took, in this process.

- memory: for MiniLM and SmolLM2-135M at fp32, int8, int4, nf4, each in a fresh process: the bytes of the block
  linear weights as stored (`quantize.linear_weight_bytes`), the resident set after loading (+ quantizing), and
  the peak resident set over 2 LoRA training steps counted from there (VmHWM reset through /proc/self/clear_refs,
  so the fp32 checkpoint read before quantizing does not count). MiniLM: batch 32 x 64 tokens; SmolLM2: 8 x 128.
- steps: LoRA (r=8, alpha=16, W_q and W_v) training step time (forward, backward, AdamW) per precision, one
  model per precision in one process, interleaved rounds (each round times every precision once), medians over
  the timed rounds; the precision `train` uses here (`--precision auto`).
- sst2: MiniLM LoRA on SST-2 with compare's default budget (`compare.TASK_SETTINGS["sst2"]`: 300 steps of 32 at
  64 tokens, the registry's learning rate), 1 seed, one `deltatune train` per precision; then each quantized-base
  delta loaded onto the fp32 base and scored again on the 872 dev sentences (a QLoRA delta served unquantized).

Writes OUT/results.json and prints it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

PRECISIONS = ["fp32", "int8", "int4", "nf4"]
MODELS = {"minilm": ("classification", 32, 64), "smollm2": ("causal-lm", 8, 128)}  # kind, batch, tokens


def _quantize(precision: str) -> str | None:
    return None if precision == "fp32" else precision


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _lora_model(name: str, precision: str):
    import deltatune
    from deltatune.models import load_model

    kind = MODELS[name][0]
    model = deltatune.attach(load_model(name, kind, quantize=_quantize(precision)), deltatune.LoRA(r=8, alpha=16),
                             task="t")
    return model.train()


def _batch(name: str, model, seed: int = 0) -> dict[str, torch.Tensor]:
    kind, batch, tokens = MODELS[name]
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab - 1, (batch, tokens), generator=generator)
    labels = ids if kind == "causal-lm" else torch.randint(0, 2, (batch,), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _step(model, optimizer, batch, precision: str) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def memory_child(name: str, precision: str) -> dict:
    from deltatune.testing import linear_weight_bytes
    from deltatune.training.loop import resolve_precision

    started = time.perf_counter()
    model = _lora_model(name, precision)
    load_seconds = time.perf_counter() - started
    gc.collect()
    after_load = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = _batch(name, model)
    for _ in range(2):
        _step(model, optimizer, batch, resolve_precision("auto"))
    return {"model": name, "precision": precision, "linear_weight_bytes": linear_weight_bytes(model.base_model),
            "rss_after_load_mb": round(after_load, 1), "peak_training_rss_mb": round(_rss_mb("VmHWM"), 1),
            "load_seconds": round(load_seconds, 1)}


def weights(models: list[str]) -> list[dict]:
    from deltatune.core.quantize import quantization_info
    from deltatune.models import load_model
    from deltatune.testing import linear_weight_bytes

    rows = []
    for name in models:
        for precision in PRECISIONS:
            started = time.perf_counter()
            model = load_model(name, MODELS[name][0], quantize=_quantize(precision))
            rows.append({"model": name, "precision": precision, "linear_weight_bytes": linear_weight_bytes(model),
                         "load_seconds": round(time.perf_counter() - started, 1),
                         "quantization": quantization_info(model)})
            print(rows[-1], flush=True)
            del model
            gc.collect()
        fp32 = rows[-len(PRECISIONS)]["linear_weight_bytes"]
        for row in rows[-len(PRECISIONS):]:
            row["linear_weights_vs_fp32"] = round(row["linear_weight_bytes"] / fp32, 3)
    return rows


def memory(models: list[str]) -> list[dict]:
    rows = []
    for name in models:
        for precision in PRECISIONS:
            out = subprocess.run([sys.executable, __file__, "--memory-child", name, precision], check=True,
                                 capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
        fp32 = rows[-len(PRECISIONS)]["linear_weight_bytes"]
        for row in rows[-len(PRECISIONS):]:
            row["linear_weights_vs_fp32"] = round(row["linear_weight_bytes"] / fp32, 3)
    return rows


def steps(models: list[str], rounds: int = 5, warmup: int = 1) -> list[dict]:
    from deltatune.training.loop import resolve_precision

    autocast = resolve_precision("auto")
    rows = []
    for name in models:
        models = {p: _lora_model(name, p) for p in PRECISIONS}
        optimizers = {p: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
                      for p, m in models.items()}
        batch = _batch(name, models["fp32"])
        times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
        for round_index in range(warmup + rounds):
            for precision in PRECISIONS:
                start = time.perf_counter()
                _step(models[precision], optimizers[precision], batch, autocast)
                if round_index >= warmup:
                    times[precision].append(time.perf_counter() - start)
        base = statistics.median(times["fp32"])
        for precision in PRECISIONS:
            median = statistics.median(times[precision])
            rows.append({"model": name, "precision": precision, "autocast": autocast,
                         "step_seconds_median": round(median, 3), "vs_fp32": round(median / base, 2),
                         "step_seconds_all": [round(t, 3) for t in times[precision]]})
            print(rows[-1], flush=True)
        del models, optimizers
        gc.collect()
    return rows


def sst2(out: Path) -> list[dict]:
    from deltatune.delta import DeltaModel
    from deltatune.evaluate import evaluate
    from deltatune.models import load_model, load_tokenizer
    from deltatune.results.compare import TASK_SETTINGS
    from deltatune.tasks import get_task
    from deltatune.training.loop import TrainConfig, train

    settings = TASK_SETTINGS["sst2"]
    steps_budget = int(settings.budget.split("=")[1])
    rows = []
    for precision in PRECISIONS:
        config = TrainConfig(model="minilm", task="sst2", method="lora", out=str(out / f"sst2-lora-{precision}"),
                             max_steps=steps_budget, max_length=settings.max_length, batch_size=32, seed=0,
                             precision="auto", quantize=_quantize(precision), progress=False)
        summary = train(config)
        rows.append({"precision": precision, "accuracy": summary["final"]["accuracy"],
                     "train_seconds": summary["train_seconds"], "peak_memory_mb": summary["peak_memory_mb"],
                     "delta": summary["delta"], "precision_ran": summary.get("precision")})
        print(rows[-1], flush=True)
    task, tokenizer = get_task("sst2"), load_tokenizer("minilm")
    examples = task.load("dev", None)
    for row in rows[1:]:  # a quantized-base delta on the fp32 base
        model = DeltaModel(load_model("minilm", "classification", num_labels=2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the note that the precisions differ: that is the point here
            model.add_delta(row["delta"])
        row["accuracy_on_fp32_base"] = evaluate(model.eval(), tokenizer, task, examples,
                                                max_length=settings.max_length)["accuracy"]
        row["fp32_base_minus_own_base"] = round(row["accuracy_on_fp32_base"] - row["accuracy"], 4)
        print(row, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="weights,memory,steps,sst2")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="fp32 first (the reference); int4 training runs ~90x slower than fp32 on a CPU")
    parser.add_argument("--rounds", type=int, default=5, help="steps: timed rounds (after one warm-up round)")
    parser.add_argument("--out", type=Path, default=Path("runs/quantized_base"))
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    PRECISIONS[:] = args.precisions.split(",")
    if PRECISIONS[0] != "fp32":
        parser.error("--precisions must start with fp32: every other precision is compared with it")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    import bitsandbytes
    import torchao
    import transformers

    started = time.perf_counter()
    results = {"command": " ".join(sys.argv), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "transformers": transformers.__version__, "torchao": torchao.__version__,
               "bitsandbytes": bitsandbytes.__version__, "load_average_start": os.getloadavg()}
    models = args.models.split(",")
    for part in args.parts.split(","):
        part_started = time.perf_counter()
        results[part] = {"weights": lambda: weights(models), "memory": lambda: memory(models),
                         "steps": lambda: steps(models, args.rounds), "sst2": lambda: sst2(args.out)}[part]()
        results[f"{part}_seconds"] = round(time.perf_counter() - part_started, 1)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
