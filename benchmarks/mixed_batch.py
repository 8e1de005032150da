"""Many tasks, one base model: throughput of mixed-task batches (`model(**batch, tasks=[...])`).

    python benchmarks/mixed_batch.py             # about 3 minutes on 2 cores
    python benchmarks/mixed_batch.py --reps 5    # quicker, noisier

MiniLM (all-MiniLM-L6-v2, the real weights), a batch of the first 32 real SST-2 dev sentences (padded to
the longest, 44 tokens), 8 task deltas per method with random non-zero values (throughput does not depend
on training). Each example of the mixed batch belongs to one of the 8 tasks (4 each, interleaved).

Rows, each one forward pass of the 32 examples (eval, inference mode, fp32, 1 thread by default):
- LoRA (r=8, alpha=16, W_q and W_v, per-task head): one task merged into the weights (the ceiling: the
  base model's cost), one task unmerged, the mixed batch, and a loop of `use(task)` over the 8 groups of 4
  (each group padded to the batch's 44, as peft's note measures, and re-padded to its own longest);
- Hugging Face peft on a copy of the same model with the same 8 adapters (weights copied, outputs checked
  equal): one adapter merged, the mixed batch with `adapter_names=`, a loop of `set_adapter`;
- BitFit, Houlsby adapters (m=64) and prompt tuning (20 tokens), 8 tasks each: one task alone (`use`), and
  the mixed batch; BitFit also merged.

The variants run interleaved (one forward of each per round, the order rotating every round) because the
machine is shared; medians over the rounds are quoted. Ratios are to the LoRA merged ceiling, and for each
method also to its own one-task row. Before timing, every mixed batch is checked against each example
run alone after `use(task)` (max |difference| of logits).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deltatune  # noqa: E402
from deltatune.models import load_model, load_tokenizer  # noqa: E402

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "dev.tsv"
TASKS, BATCH, R, ALPHA = 8, 32, 8, 16


def sentences(count: int) -> list[str]:
    with open(SST2_DEV, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[0] for row in rows[1 : count + 1]]


def randomise(model: deltatune.DeltaModel, task: str, seed: int, scale: float = 0.05) -> None:
    """Non-zero values for every parameter of a task (B of LoRA, W_up of adapters start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.task_parameters(task).values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)


def with_tasks(config, names: list[str], scale: float = 0.05) -> deltatune.DeltaModel:
    model = None
    for index, name in enumerate(names):
        model = deltatune.attach(model or load_model("minilm", "classification"), config, task=name)
        randomise(model, name, seed=index, scale=scale)
    return model


def interleaved_times(variants: dict[str, Callable], rounds: int) -> tuple[dict[str, list], dict[str, list]]:
    """(wall, CPU) seconds of each variant's call over `rounds` rounds, one call of each per round, the order
    rotating every round (so a shared machine's load falls on all alike); one warm-up call each first."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    with torch.inference_mode():
        for run in variants.values():  # warm-up (and stacks cached)
            run()
        for round_index in range(rounds):
            shift = round_index % len(order)
            for name in order[shift:] + order[:shift]:
                start, start_cpu = time.perf_counter(), time.process_time()
                variants[name]()
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


@torch.inference_mode()
def largest_difference(model: deltatune.DeltaModel, batch: dict, tasks: list[str]) -> float:
    """max |mixed - alone| over the batch: each example alone, unpadded, after use(its task)."""
    mixed = model(**batch, tasks=tasks).logits
    worst = 0.0
    for i, task in enumerate(tasks):
        length = int(batch["attention_mask"][i].sum())
        alone = model.use(task)(**{k: v[i : i + 1, :length] for k, v in batch.items()}).logits
        worst = max(worst, (alone[0] - mixed[i]).abs().max().item())
    return worst


def group_loop(model, batch: dict, tasks: list[str], names: list[str], repad: bool, switch: Callable) -> Callable:
    """One forward per task over its examples (switching the active task), logits put back in order."""
    groups = []
    for name in names:
        index = torch.tensor([i for i, t in enumerate(tasks) if t == name])
        part = {k: v[index] for k, v in batch.items()}
        if repad:
            longest = int(part["attention_mask"].sum(1).max())
            part = {k: v[:, :longest] for k, v in part.items()}
        groups.append((name, index, part))

    def run() -> torch.Tensor:
        logits = torch.empty(len(tasks), 2)
        for name, index, part in groups:
            switch(name)
            logits[index] = model(**part).logits
        return logits

    return run


def peft_model(ours: deltatune.DeltaModel, names: list[str]):
    """peft on a fresh copy of MiniLM, with our 8 LoRA tasks' A, B and heads copied in."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query", "value"],
                        modules_to_save=["classifier"])
    model = get_peft_model(load_model("minilm", "classification"), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    with torch.no_grad():
        theirs = dict(model.named_parameters())
        for name in names:
            for key, tensor in ours.task_parameters(name).items():
                if key.endswith(("lora_A", "lora_B")):
                    layer, _, which = key.rpartition(".")
                    target = f"base_model.model.{layer}.{which}.{name}.weight"
                else:  # classifier.weight -> ...classifier.modules_to_save.<name>.weight
                    module, _, leaf = key.rpartition(".")
                    target = f"base_model.model.{module}.modules_to_save.{name}.{leaf}"
                theirs[target].copy_(tensor)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="interleaved rounds (medians are quoted)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time = the work's cost)")
    parser.add_argument("--no-peft", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = load_tokenizer("minilm")
    batch = dict(tokenizer(sentences(BATCH), padding=True, return_tensors="pt"))
    names = [f"task{i}" for i in range(TASKS)]
    tasks = [names[i % TASKS] for i in range(BATCH)]
    print(f"MiniLM, {BATCH} SST-2 dev sentences padded to {batch['input_ids'].shape[1]} tokens, {TASKS} tasks "
          f"per method; torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}")

    lora = with_tasks(deltatune.LoRA(r=R, alpha=ALPHA), names)
    merged = copy.deepcopy(lora).use(names[0]).merge()
    bitfit = with_tasks(deltatune.BitFit(), names)
    bitfit_merged = copy.deepcopy(bitfit).use(names[0]).merge()
    adapter = with_tasks(deltatune.Adapter(bottleneck=64), names)
    prompt = with_tasks(deltatune.PromptTuning(length=20), names)

    checks = {label: largest_difference(model, batch, tasks)
              for label, model in [("lora", lora), ("bitfit", bitfit), ("adapter", adapter), ("prompt", prompt)]}
    print("mixed batch vs each example alone after use(task), max |logit difference|: "
          + ", ".join(f"{k} {v:.1e}" for k, v in checks.items()))

    def single(model: deltatune.DeltaModel) -> Callable:
        return lambda: model.use(names[0])(**batch).logits

    def mixed(model: deltatune.DeltaModel) -> Callable:
        return lambda: model(**batch, tasks=tasks).logits

    variants: dict[str, tuple[str, Callable]] = {
        "lora: one task merged (ceiling)": ("lora", lambda: merged(**batch).logits),
        "lora: one task unmerged": ("lora", single(lora)),
        "lora: mixed, 8 tasks": ("lora", mixed(lora)),
        "lora: loop use() x8 groups (padded 44)": ("lora", group_loop(lora, batch, tasks, names, False, lora.use)),
        "lora: loop use() x8 groups (re-padded)": ("lora", group_loop(lora, batch, tasks, names, True, lora.use)),
    }
    if not args.no_peft:
        import peft

        theirs = peft_model(lora, names)
        with torch.inference_mode():
            expected = lora(**batch, tasks=tasks).logits
            got = theirs(**batch, adapter_names=tasks).logits
        print(f"peft {peft.__version__} mixed batch vs deltatune mixed batch, max |logit difference|: "
              f"{(got - expected).abs().max().item():.1e}")
        theirs_merged = peft_model(lora, names)
        theirs_merged.set_adapter(names[0])
        theirs_merged.base_model.merge_adapter([names[0]])
        variants.update({
            "peft: one adapter merged": ("peft", lambda: theirs_merged(**batch).logits),
            "peft: mixed, adapter_names=": ("peft", lambda: theirs(**batch, adapter_names=tasks).logits),
            "peft: loop set_adapter x8 (padded 44)": (
                "peft", group_loop(theirs, batch, tasks, names, False, theirs.set_adapter)),
        })
    variants.update({
        "bitfit: one task merged": ("bitfit", lambda: bitfit_merged(**batch).logits),
        "bitfit: one task unmerged": ("bitfit", single(bitfit)),
        "bitfit: mixed, 8 tasks": ("bitfit", mixed(bitfit)),
        "adapter: one task": ("adapter", single(adapter)),
        "adapter: mixed, 8 tasks": ("adapter", mixed(adapter)),
        "prompt: one task": ("prompt", single(prompt)),
        "prompt: mixed, 8 tasks": ("prompt", mixed(prompt)),
    })

    wall, cpu = interleaved_times({name: run for name, (_, run) in variants.items()}, args.reps)

    print(f"\n{args.reps} interleaved rounds, medians; throughput = {BATCH} / median time. 'wall': elapsed time; "
          f"'cpu': this process's CPU time (with 1 thread, what the work cost, whatever else runs on the machine)")
    for label, times in (("wall", wall), ("cpu", cpu)):
        median = {name: statistics.median(values) for name, values in times.items()}
        ceiling = median["lora: one task merged (ceiling)"]
        own = {"lora": ceiling, "peft": median.get("peft: one adapter merged", ceiling),
               "bitfit": median["bitfit: one task merged"], "adapter": median["adapter: one task"],
               "prompt": median["prompt: one task"]}
        print(f"\n{label + ' time':<42} {'ms/batch':>9} {'ex/s':>7} {'vs ceiling':>10} {'vs own 1-task':>13}  IQR ms")
        for name, (method, _) in variants.items():
            low, _, high = statistics.quantiles(times[name], n=4) if len(times[name]) >= 2 else [median[name]] * 3
            print(f"{name:<42} {1e3 * median[name]:>9.1f} {BATCH / median[name]:>7.1f} {ceiling / median[name]:>9.2f}x "
                  f"{own[method] / median[name]:>12.2f}x  {1e3 * low:.0f}-{1e3 * high:.0f}")


if __name__ == "__main__":
    main()
