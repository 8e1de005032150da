"""Top-k fine-tuning and AdapterDrop in mixed-task batches: the shared lower blocks, against one task at a time.

    python benchmarks/mixed_topk_adapterdrop.py              # a few minutes on one busy core
    python benchmarks/mixed_topk_adapterdrop.py --reps 20    # steadier

MiniLM (all-MiniLM-L6-v2, 6 blocks, real weights), real SST-2 dev sentences, 4 task deltas per method with
random non-zero values (speed does not depend on training), eval, inference mode, fp32, 1 thread:

- top-2 fine-tuning (`TopLayers(k=2)`: blocks 4-5, the pooler and the head per task);
- AdapterDrop (`Adapter(skip_layers=3)`: Houlsby adapters, m=64, in blocks 3-5 only);
- Houlsby adapters (`Adapter()`, m=64, every block): the reference, which has nothing to share.

Two workloads of 16 rows, each timed as one mixed pass (`model(**batch, tasks=[...])`) and as a loop of
`use(task)` + one forward per task over its rows:
- "different inputs": 16 sentences, 4 per task (padded to the longest of the 16);
- "one input, 4 tasks": 4 sentences, each asked of all 4 tasks (the mixed pass runs the blocks no task of
  the batch changes once per sentence: `deltatune.core.shared_lower`; also timed with that sharing turned off).

Plus one task alone at batch 1 and 16: AdapterDrop against Houlsby (fewer adapters: less added time).
Variants run interleaved, medians over the rounds; CPU time of the one thread is the cost quoted (the
machine is shared, so wall time waits for other processes). Before timing every mixed pass is checked against each
example run alone after `use(task)`.
"""

from __future__ import annotations

import argparse
import contextlib
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
import deltatune.delta  # noqa: E402
from deltatune.models import load_model, load_tokenizer  # noqa: E402

SST2_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue" / "sst2" / "dev.tsv"
NAMES = ["task0", "task1", "task2", "task3"]
METHODS = {
    "top-2": deltatune.TopLayers(k=2),
    "AdapterDrop (skip 3)": deltatune.Adapter(bottleneck=64, skip_layers=3),
    "Houlsby": deltatune.Adapter(bottleneck=64),
}


def sentences(count: int) -> list[str]:
    with open(SST2_DEV, newline="") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [row[0] for row in rows[1 : count + 1]]


def with_tasks(config) -> deltatune.DeltaModel:
    model = None
    for index, name in enumerate(NAMES):
        model = deltatune.attach(model or load_model("minilm", "classification"), config, task=name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for tensor in model.task_parameters(name).values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


@torch.inference_mode()
def largest_difference(model: deltatune.DeltaModel, batch: dict, tasks: list[str]) -> float:
    mixed = model(**batch, tasks=tasks).logits
    worst = 0.0
    for i, task in enumerate(tasks):
        length = int(batch["attention_mask"][i].sum())
        alone = model.use(task)(**{k: v[i : i + 1, :length] for k, v in batch.items()}).logits
        worst = max(worst, (alone[0] - mixed[i]).abs().max().item())
    return worst


def one_at_a_time(model: deltatune.DeltaModel, batch: dict, tasks: list[str]) -> Callable:
    """use(task), then one forward over that task's rows (re-padded to their longest), for each task."""
    groups = []
    for name in NAMES:
        index = torch.tensor([i for i, t in enumerate(tasks) if t == name])
        part = {k: v[index] for k, v in batch.items()}
        longest = int(part["attention_mask"].sum(1).max())
        groups.append((name, {k: v[:, :longest] for k, v in part.items()}))
    return lambda: [model.use(name)(**part).logits for name, part in groups]


@contextlib.contextmanager
def no_sharing():
    """The mixed pass without `shared_lower` (every row through every block)."""
    original = deltatune.delta.share_lower_blocks
    deltatune.delta.share_lower_blocks = lambda *args: contextlib.nullcontext()
    try:
        yield
    finally:
        deltatune.delta.share_lower_blocks = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="interleaved rounds (medians are quoted)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    tokenizer = load_tokenizer("minilm")
    different = dict(tokenizer(sentences(16), padding=True, return_tensors="pt"))
    different_tasks = [NAMES[i % 4] for i in range(16)]
    four = tokenizer(sentences(4), padding=True, return_tensors="pt")
    shared = {k: v.repeat_interleave(4, 0) for k, v in four.items()}  # each sentence once per task
    shared_tasks = NAMES * 4
    single = {size: dict(tokenizer(sentences(size), padding=True, return_tensors="pt")) for size in (1, 16)}
    print(f"MiniLM-L6, SST-2 dev sentences (16 padded to {different['input_ids'].shape[1]} tokens; 4 padded to "
          f"{shared['input_ids'].shape[1]}); torch {torch.__version__}, 1 thread, {platform.machine()}, "
          f"{platform.processor() or platform.platform()}")

    models = {label: with_tasks(config) for label, config in METHODS.items()}
    for label, model in models.items():
        print(f"{label}: mixed vs each example alone, max |logit difference|: "
              f"different inputs {largest_difference(model, different, different_tasks):.1e}, "
              f"one input x 4 tasks {largest_difference(model, shared, shared_tasks):.1e}")

    def mixed(model, batch, tasks, sharing=True) -> Callable:
        if sharing:
            return lambda: model(**batch, tasks=tasks).logits

        def run():
            with no_sharing():
                return model(**batch, tasks=tasks).logits
        return run

    variants: dict[str, Callable] = {}
    for label, model in models.items():
        variants[f"{label} | different inputs | mixed pass"] = mixed(model, different, different_tasks)
        variants[f"{label} | different inputs | one task at a time"] = one_at_a_time(model, different, different_tasks)
        variants[f"{label} | one input, 4 tasks | mixed pass"] = mixed(model, shared, shared_tasks)
        if label != "Houlsby":  # nothing to share: its mixed pass is the unshared one
            variants[f"{label} | one input, 4 tasks | mixed, sharing off"] = mixed(model, shared, shared_tasks, False)
        variants[f"{label} | one input, 4 tasks | one task at a time"] = one_at_a_time(model, shared, shared_tasks)
    for size, batch in single.items():
        for label in ("AdapterDrop (skip 3)", "Houlsby"):
            model = models[label]
            variants[f"{label} | one task, batch {size} | use(task)"] = (
                lambda model=model, batch=batch: model.use(NAMES[0])(**batch).logits)

    times: dict[str, list[float]] = {name: [] for name in variants}  # CPU seconds of this (the only) thread
    walls: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    start = time.perf_counter()
    with torch.inference_mode():
        for round_index in range(args.reps + 2):  # two warm-up rounds
            rotation = order[round_index % len(order):] + order[: round_index % len(order)]
            for name in rotation:
                began, began_cpu = time.perf_counter(), time.thread_time()
                variants[name]()
                if round_index >= 2:
                    times[name].append(time.thread_time() - began_cpu)
                    walls[name].append(time.perf_counter() - began)
    print(f"\n{args.reps} rounds in {time.perf_counter() - start:.0f} s; median per pass (or per loop): CPU ms of "
          f"the one thread (the work's cost; the machine is shared) and wall ms\n")
    print("| method | workload | variant | CPU ms | wall ms | speedup vs one task at a time (CPU) |")
    print("|---|---|---|---:|---:|---:|")
    for name in variants:
        label, workload, variant = name.split(" | ")
        median = 1000 * statistics.median(times[name])
        loop = f"{label} | {workload} | one task at a time"
        ratio = f"{statistics.median(times[loop]) / statistics.median(times[name]):.2f}x" \
            if loop in times and loop != name else ""
        wall = 1000 * statistics.median(walls[name])
        print(f"| {label} | {workload} | {variant} | {median:.1f} | {wall:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
