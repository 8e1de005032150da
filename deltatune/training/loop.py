"""The training loop, read top to bottom (nanoGPT-style), on `accelerate`.

    summary = train(TrainConfig(model="minilm", task="sst2", method="lora", out="runs/sst2-lora"))

`setup` builds a `Run` once (accelerator, model, data, optimizer, schedule, fresh or resumed state); `_loop`
is the loop: `forward_backward` / `optimizer_step` / `evaluate_and_keep_best` / checkpoint / `write_summary`.
Multi-process helpers are in `distributed.py`.

Same code on the CPU, one GPU (bf16 autocast) or several processes (`accelerate launch` /
`torchrun`, on GPUs or on CPUs with gloo): each rank takes its slice of every global batch, the
trainable parameters' gradients are all-reduced (DDP) — or, with `fsdp=True`, every parameter is
sharded over the ranks (FSDP2) — and the update is exactly the one-process update for the same
global batch; every rank takes the same decisions; rank 0 logs and saves the complete delta.
AdamW, linear warmup then linear decay, gradient clipping and accumulation, evaluation every N steps
or each epoch (split over the ranks), the best delta kept. Checkpoints hold the delta, optimizer,
scheduler, RNG states and data position, so `resume=True` ends with exactly the delta of an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deltatune.config_file import write_config
from deltatune.core.quantize import SCHEMES
from deltatune.delta import DeltaModel, attach
from deltatune.errors import TrainingError
from deltatune.evaluate import task_loss
from deltatune.formats.native import RUN_DELTA, atomic_folder, recover
from deltatune.methods.registry import METHODS, build_config, method_entry
from deltatune.models import MODEL_HELP
from deltatune.tasks import DATA_DIR_ENV, TASK_NAMES, Task, get_task
from deltatune.tasks.catalog import FILE_FORMATS
from deltatune.tasks.encoding import IGNORE_INDEX, Encoded, collate, encode, epoch_batches, max_model_length
from deltatune.tasks.preference import EncodedPair, encode_pairs
from deltatune.training import trackers
from deltatune.training.distributed import evaluate_sharded, full_parameters, launched, max_over_ranks, shard_model
from deltatune.training.preference import (
    OBJECTIVES,
    REFERENCE_PASSES,
    PreferenceObjective,
    prepare_policy,
    resolve_reference_pass,
)
from deltatune.training.preference import task_options as preference_task_options
from deltatune.training.progress import ProgressDisplay

PRECISIONS = ["auto", "fp32", "bf16"]
QUANTIZE_CHOICES = SCHEMES


@dataclass
class TrainConfig:
    """One training run. Each field's `help` is also its `deltatune train --option` (cli.add_options);
    `cli: False` marks the fields the command line fills from other options (-o, --data-file...)."""

    model: str = field(metadata={"help": MODEL_HELP})
    task: str = field(metadata={"help": " | ".join(TASK_NAMES) + f" ({', '.join(FILE_FORMATS)}: your own data, "
                                                                  f"--data-file)"})
    method: str = field(metadata={"help": "what trains (methods/registry.py)", "choices": list(METHODS)})
    out: str = field(metadata={"help": "run folder (delta, checkpoints, metrics.jsonl, summary.json)"})
    method_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})  # -o KEY=VALUE
    task_options: dict[str, Any] = field(default_factory=dict, metadata={"cli": False})  # csv/jsonl: path, columns
    data_dir: str | None = field(
        default=None, metadata={"help": "folder laid out like shared/data (default: $DELTATUNE_DATA, then the hub)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    max_seconds: float | None = field(
        default=None, metadata={"help": "wall-clock budget: stop after this much time in the training loop, "
                                         "evaluations during it included"})
    batch_size: int = field(
        default=32, metadata={"help": "examples per batch (a global batch, split over the processes)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float | None = field(
        default=None, metadata={"help": "learning rate (default: the method's, registry.METHODS[...].default_lr)"})
    lr_ratio: float = field(default=1.0, metadata={
        "help": "LoRA+ (Hayou et al. 2024): LoRA's B matrices learn at this multiple of --lr, A and the head at "
                "--lr (the paper suggests 16); 1: off"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    warmup_ratio: float = field(default=0.06, metadata={"help": "share of the steps with a linear warmup"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    max_length: int = field(default=128, metadata={"help": "tokens per input (longer ones are cut)"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, dropout and data order"})
    eval_every: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: each epoch)"})
    eval_split: str = field(default="dev", metadata={"help": "the split evaluated during training"})
    train_limit: int | None = field(default=None, metadata={"help": "use only the first N training examples"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N examples only"})
    checkpoint_every: int | None = field(
        default=None, metadata={"help": "checkpoint every N steps (for --resume)"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint"})
    # the library default is fp32 (the same numbers on every machine); the command line takes the fastest
    # precision the hardware has
    precision: str = field(default="fp32", metadata={
        "help": "auto (the command's default): bf16 autocast where the CPU/GPU has native bf16 math, else fp32 "
                "(`resolve_precision`)",
        "choices": PRECISIONS, "cli_default": "auto"})
    quantize: str | None = field(default=None, metadata={
        "help": "store the base's block linear weights quantized (QLoRA's frozen base): int8 | int4 | nf4 "
                "(deltatune.core.quantize); the delta trains in full precision",
        "choices": list(QUANTIZE_CHOICES)})
    length_bucketing: bool = field(
        default=True, metadata={"help": "batch inputs of similar length together (less padding)"})
    log_every: int = field(default=10, metadata={"help": "log the loss every N steps"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    on_nonfinite: str = field(
        default="stop", metadata={"help": "a NaN/Inf loss: stop, or skip the batch", "choices": ["stop", "skip"]})
    grad_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass (less memory)"})
    fsdp: bool = field(default=False, metadata={
        "help": "under torchrun / accelerate launch: shard the model over the processes (FSDP2) instead of "
                "replicating it"})
    objective: str = field(default="sft", metadata={
        "help": "sft: the likelihood of the targets; dpo (Rafailov et al. 2023) or simpo (Meng et al. 2024): "
                "preference tuning on a --task jsonl file of prompt/chosen/rejected rows (training/preference.py)",
        "choices": list(OBJECTIVES)})
    beta: float = field(default=0.1, metadata={
        "help": "dpo/simpo: the preference strength beta (DPO: 0.1 as in TRL; SimPO: the paper's 2.0-2.5)"})
    reference: str | None = field(default=None, metadata={
        "help": "dpo: the reference model's delta (e.g. the SFT delta; the policy starts as a copy of it); "
                "default: the base with the delta off"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "simpo: the target reward margin gamma"})
    reference_pass: str = field(default="auto", metadata={
        "help": "dpo: the reference's log-probs in the same mixed forward as the policy's (mixable methods), or in "
                "a second forward without gradients; auto: second on a CPU (measured 1.6x faster there: "
                "docs/results/dpo_e2e.md), same on CUDA (one read of the weights for both; untested on a GPU)",
        "choices": list(REFERENCE_PASSES)})
    report_to: list[str] | None = field(default=None, metadata={
        "help": "experiment trackers, any of tensorboard,mlflow,wandb: loss, learning rate, evaluations, the config "
                "and the delta (training/trackers.py; default: none)"})


def resolve_precision(precision: str) -> str:
    """"auto" -> "bf16" on hardware with native bf16 math (a CUDA GPU that supports it; a CPU with AVX512-BF16
    or AMX), else "fp32". bf16 autocast keeps fp32 weights, gradients and optimizer state; only the matrix
    products run in bf16: 1.3-1.9x faster steps on such CPUs, with the same SST-2 dev accuracy
    (docs/results/vs_peft.md). Without native support bf16 is emulated and slower, hence fp32 there."""
    if precision != "auto":
        if precision not in PRECISIONS:
            raise TrainingError(f"precision {precision!r}: choose fp32, bf16 or auto")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if native else "fp32"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, task, tokenizer=None) -> DeltaModel:
    """Base model with the task's head, and the method attached for the task."""
    from deltatune.models import load_model

    if task.prompt_format is not None and tokenizer is not None:  # a chat file needs a template: say so first
        task.prompt_format.resolve(tokenizer)
    kind = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}[task.kind]
    base = load_model(config.model, kind, num_labels=task.num_labels if task.kind == "classification" else None,
                      quantize=config.quantize)
    method_config = build_config(config.method, config.method_options, source="method_options")
    if tokenizer is not None and hasattr(method_config, "tokenize"):  # settings given as text (a prompt's init)
        method_config.tokenize(tokenizer)
    model = attach(base, method_config, task=task_slug(task.name), label_names=task.label_names)
    if task.prompt_format is not None and tokenizer is not None:  # saved with the delta: generate/serve reuse it
        model.task_info[task_slug(task.name)]["prompt_format"] = task.prompt_format.resolve(tokenizer).to_dict()
    return model


def use_eager_attention(model: DeltaModel) -> None:
    """Training on a CPU: attention as plain matrix products instead of PyTorch's CPU flash-attention kernel,
    whose backward pass is slow for the short sequences of fine-tuning (SmolLM2 on E2E, 46 tokens, bf16: a
    quarter of the step; docs/results/e2e_train_speed.md). The same computation up to float rounding."""
    base = model.base_model
    if getattr(getattr(base, "config", None), "_attn_implementation", None) == "sdpa" and hasattr(
            base, "set_attn_implementation"):
        try:
            base.set_attn_implementation("eager")
        except (ValueError, ImportError):  # a model without an eager path keeps its attention
            pass


def task_slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "task"


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate, keep the best delta in `out/delta`; return the run summary."""
    watched = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in watched} if _main_thread() else {}
    try:
        return _train(config)
    finally:  # a run that raised must not leave its SIGINT/SIGTERM handlers behind (e.g. in a notebook)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(config: TrainConfig) -> dict[str, Any]:
    run = setup(config)
    try:
        summary = _loop(run)
        if run.is_main:
            trackers.log_delta(run.accelerator, run.out, run.task.name)
        return summary
    finally:  # a failed run's trackers are closed too (TensorBoard flushed, the MLflow run ended)
        trackers.finish_trackers(run.accelerator)


def _loop(run: Run) -> dict[str, Any]:
    """Step, log, evaluate, checkpoint until the budget is spent; then the summary."""
    config = run.config
    # on every rank (torchrun and accelerate pass the signal on to each): all of them stop after the same step
    if _main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, run.request_stop)
    progress = _Progress(run.total_steps, enabled=run.is_main and config.progress, start=run.state.step)
    run.model.train()
    run.started = time.perf_counter() - run.state.train_seconds
    while run.state.step < run.total_steps:
        loss = forward_backward(run)
        if not math.isfinite(loss):
            skip_nonfinite_step(run, loss)  # or raise TrainingError
            continue
        optimizer_step(run, loss)
        log_step(run, loss, progress)
        if evaluation_due(run):
            evaluate_and_keep_best(run)
        run.state.train_seconds = time.perf_counter() - run.started
        # ranks decide together (a checkpoint gathers from all of them; one stopping alone would leave the
        # others waiting): a signal any rank got, the longest training time
        signum, seconds = max_over_ranks([run.stop_signal or 0, run.state.train_seconds], run.device)
        if signum or (config.checkpoint_every and run.state.step % config.checkpoint_every == 0):
            save_checkpoint(run.out / "checkpoint", run.model, run.optimizer, run.scheduler, asdict(run.state),
                            run.is_main)
        if config.max_seconds and seconds >= config.max_seconds:
            run.log({"step": run.state.step, "stopped": f"time budget of {config.max_seconds} s reached"})
            break
        if signum:
            progress.close()
            raise KeyboardInterrupt(f"stopped by {signal.Signals(int(signum)).name} at step {run.state.step}; "
                                    f"checkpoint saved in {run.out / 'checkpoint'} (resume with --resume)")
    progress.close()
    if not run.last_metrics or run.evaluated_at != run.state.step:  # score the final weights too
        evaluate_and_keep_best(run)
    return write_summary(run)


# ---- setup: everything the loop reads, built once ------------------------------------------------
@dataclass
class RunState:
    """The loop's progress: saved in every checkpoint (`state.json`), so a resumed run goes on from it."""

    step: int = 0  # optimizer steps taken
    best: float | None = None  # best score of the task's main metric so far ...
    best_step: int | None = None  # ... and the step whose delta is in OUT/delta
    examples: int = 0  # training examples seen (whole global batches)
    train_seconds: float = 0.0  # since training started, evaluations included (what --max-seconds counts)
    eval_seconds: float = 0.0  # the evaluations' share of it


@dataclass
class Run:
    """One training run, built by `setup`: what the loop reads (model, data, optimizer, schedule) and what
    it updates (`state`, checkpointed; the rest lasts as long as the process)."""

    config: TrainConfig
    accelerator: Any  # accelerate.Accelerator: device, DDP, bf16 autocast, collectives
    precision: str  # "fp32" or "bf16", `config.precision` resolved
    task: Task
    tokenizer: Any
    model: DeltaModel
    prepared_model: torch.nn.Module  # `model` as accelerate wrapped it (DDP); `model` itself under FSDP
    max_length: int
    train_items: list[Encoded]
    lengths: list[int] | None  # per training item, for length bucketing (None: off)
    eval_examples: list[dict]
    steps_per_epoch: int
    total_steps: int
    lr: float
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    out: Path
    state: RunState = field(default_factory=RunState)
    started: float = 0.0  # time.perf_counter() when training started, the resumed run's time included
    evaluated_at: int | None = None  # the step last evaluated
    last_metrics: dict[str, float] = field(default_factory=dict)
    loss_window: list[float] = field(default_factory=list)  # every step's loss, for logging and explosions
    epoch_batches: dict[int, list[list[int]]] = field(default_factory=dict)  # the current epoch's global batches
    stop_signal: int | None = None  # SIGINT/SIGTERM received: checkpoint after this step, then stop
    objective: PreferenceObjective | None = None  # dpo/simpo (training/preference.py); None: sft
    eval_items: list = field(default_factory=list)  # dpo/simpo: the encoded dev pairs

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def main_metric(self) -> str:
        return self.task.metric_names[0]

    def log(self, record: dict) -> None:
        """One record of metrics.jsonl (rank 0), also sent to the --report-to trackers."""
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            trackers.log_record(self.accelerator, record)

    def request_stop(self, signum, frame) -> None:  # the SIGINT/SIGTERM handler
        self.stop_signal = signum


def setup(config: TrainConfig) -> Run:
    """Accelerator, model, data, optimizer, schedule and state (fresh or resumed), in the order that fixes
    the random draws: the seed, then the model's new parameters, then the data."""
    from deltatune.models import load_tokenizer

    trackers.check_trackers(config.report_to)  # an unknown or missing tracker fails before the model loads
    accelerator, precision = _accelerator(config.precision,
                                          trackers.make_trackers(config.report_to, Path(config.out)))
    set_seed(config.seed)
    task = get_task(config.task, **preference_task_options(config.objective, config.task_options))
    tokenizer = load_tokenizer(config.model)
    model = build_model(config, task, tokenizer)
    objective = _objective(config, model)
    if accelerator.device.type == "cpu":
        use_eager_attention(model)
    if config.grad_checkpointing:
        _enable_grad_checkpointing(model)
    max_length = max_model_length(model, tokenizer, config.max_length)
    train_examples = task.load("train", config.data_dir, limit=config.train_limit)
    eval_examples = task.load(config.eval_split, config.data_dir, limit=config.eval_limit)
    train_items = encode(task, train_examples, tokenizer, max_length) if objective is None else \
        encode_pairs(task.prompt_format, train_examples, tokenizer, max_length)
    lengths = [len(item.input_ids) for item in train_items] if config.length_bucketing else None
    steps_per_epoch = math.ceil(len(train_items) / config.batch_size) // config.grad_accum
    total_steps = config.max_steps or max(1, int(steps_per_epoch * config.epochs))
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_items)} training examples make fewer batches of {config.batch_size} than "
                            f"one optimizer step needs ({config.grad_accum}, --grad-accum)")
    sharded = config.fsdp and launched()  # (one process started alone: nothing to shard)
    if sharded:
        shard_model(model, accelerator.device)  # before the optimizer: the parameters become shards
    lr = config.lr or method_entry(config.method).default_lr
    trainable, optimizer, scheduler = _optimizer(model, lr, config.weight_decay, config.warmup_ratio, total_steps,
                                                 config.lr_ratio)
    if sharded:  # accelerate would wrap the sharded model in DDP
        prepared_model, optimizer = model, accelerator.prepare(optimizer)
    else:
        prepared_model, optimizer = accelerator.prepare(model, optimizer)
    run = Run(config, accelerator, precision, task, tokenizer, model, prepared_model, max_length, train_items,
              lengths, eval_examples, steps_per_epoch, total_steps, lr, trainable, optimizer, scheduler,
              out=Path(config.out), objective=objective)
    if objective is not None:
        run.eval_items = encode_pairs(task.prompt_format, eval_examples, tokenizer, max_length)
    run.state = _start_or_resume(run)
    trackers.start_trackers(accelerator, resolved_config(run), run.out)
    return run


def _objective(config: TrainConfig, model: DeltaModel) -> PreferenceObjective | None:
    """dpo/simpo: the preference loss, the policy made a copy of a --reference delta first; sft: None."""
    if config.objective == "sft":
        if config.reference:
            raise TrainingError("--reference is DPO's reference model; pass --objective dpo, or drop --reference")
        return None
    policy = model.active_task
    reference = prepare_policy(model, policy, config.reference, config.method)
    return PreferenceObjective(config.objective, config.beta, policy, reference,
                               one_pass=resolve_reference_pass(config.reference_pass) == "same",
                               simpo_gamma=config.simpo_gamma)


def _accelerator(precision_option: str, trackers: list | None = None):
    """(accelerate.Accelerator logging to `trackers`, "fp32" | "bf16")."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # cpu=True where there is no GPU: accelerate then sees torchrun's processes (gloo); otherwise it
    # silently trains one full copy per process
    gpu = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    precision = resolve_precision(precision_option)
    mixed_precision = "bf16" if precision == "bf16" else "no"
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        # accelerate keeps the first run's precision for the whole process and refuses another one; a second
        # run in the same process (a notebook, a benchmark) may ask for a different one. The process group
        # (PartialState) is kept.
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=not gpu, log_with=trackers or None), precision


def _enable_grad_checkpointing(model: DeltaModel) -> None:
    # non-reentrant: needs no input that requires grad (frozen embeddings, prompts) and, unlike the
    # reentrant one, marks each parameter ready once under DDP and re-gathers FSDP shards
    options = {"use_reentrant": False}
    if hasattr(model.base_model, "activation_checkpointing_enable"):  # transformers >= 5.24
        model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def _optimizer(model: DeltaModel, lr: float, weight_decay: float, warmup_ratio: float, total_steps: int,
               lr_ratio: float = 1.0):
    """(trainable parameters, AdamW, linear warmup then linear decay to 0).

    With `lr_ratio` != 1 (LoRA+, Hayou et al. 2024 §4: B's learning rate = ratio x A's) the LoRA B matrices
    form their own group at `lr_ratio * lr`; A, the head and everything else keep `lr` (peft's
    `create_loraplus_optimizer` also puts 1-D parameters, e.g. the head's bias, at the B rate; not here)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the model has no trainable parameters")
    B_matrices = _lora_B_matrices(model, lr_ratio)
    decay = [p for p in trainable if p.ndim >= 2 and id(p) not in B_matrices]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and norms: no weight decay
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if B_matrices:
        groups.append({"params": [p for p in trainable if id(p) in B_matrices], "weight_decay": weight_decay,
                       "lr": lr * lr_ratio})
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = int(warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return trainable, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _lora_B_matrices(model: DeltaModel, lr_ratio: float) -> set[int]:
    """ids of the active task's LoRA B matrices (parameters named `lora_B`, the LoRA family's API) when LoRA+
    is on; refuses a ratio for a method that has none."""
    if lr_ratio == 1.0:
        return set()
    method = model.task_info[model.active_task]["method"]
    if not lr_ratio > 0 or not math.isfinite(lr_ratio):
        raise TrainingError(f"--lr-ratio must be a positive number (B's learning rate / A's), not {lr_ratio}")
    found = {id(p) for key, p in model.trained_parameters().items() if key.rpartition(".")[2] == "lora_B"}
    if not found:
        raise TrainingError(f"--lr-ratio {lr_ratio} (LoRA+) sets the learning rate of LoRA's B matrices, and "
                            f"method {method!r} has none; drop --lr-ratio or train a LoRA method")
    return found


def _start_or_resume(run: Run) -> RunState:
    """The state in OUT/checkpoint with `resume` (the model, optimizer, scheduler and RNG restored too);
    else a fresh state and a fresh run folder."""
    checkpoint = run.out / "checkpoint"
    if run.config.resume and run.is_main:
        recover(checkpoint)  # a checkpoint save killed between its two renames left it aside
    run.accelerator.wait_for_everyone()  # every rank reads the checkpoint rank 0 recovered
    if run.config.resume and checkpoint.is_dir():
        return RunState(**load_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.rank))
    if run.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "metrics.jsonl").write_text("")
        write_config(resolved_config(run), run.out / "config.yaml")
    return RunState()


def resolved_config(run: Run) -> dict[str, Any]:
    """The settings as this run used them (learning rate, precision, data folder resolved): OUT/config.yaml, from
    which `deltatune train --config OUT/config.yaml` trains the same delta, and what the trackers record."""
    task_options = dict(run.config.task_options)
    if "data" in task_options:  # a datasets.Dataset in memory: named, not copied (save_to_disk it, pass path=)
        task_options["data"] = f"<a datasets.{type(task_options['data']).__name__}, not saved>"
    return {**asdict(replace(run.config, task_options={})), "task_options": task_options, "lr": run.lr,
            "precision": run.precision, "data_dir": run.config.data_dir or os.environ.get(DATA_DIR_ENV)}


# ---- one step --------------------------------------------------------------------------------------
def forward_backward(run: Run) -> float:
    """Gradients of one global batch, accumulated over `grad_accum` micro-batches, this rank computing its
    slice of each. Returns the global batch's loss (the same on every rank)."""
    config, accelerator = run.config, run.accelerator
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = torch.zeros((), dtype=torch.float64, device=run.device)
    for micro in range(config.grad_accum):
        global_indices = _global_batch(run, run.state.step * config.grad_accum + micro)
        indices = global_indices[run.rank :: run.world]  # this rank's slice of the global batch
        # The slice's mean loss, weighted by the slice's share of the batch (times `world`, as the ranks'
        # gradients are averaged): the update is the one-process update even when slices differ in size
        # (7 examples on 2 ranks: 4 + 3). A rank left without examples computes a loss weighted 0, as
        # it must join the gradient all-reduce anyway.
        weight = run.world * _loss_units(run.task, [run.train_items[i] for i in indices]) \
            / max(1, _loss_units(run.task, [run.train_items[i] for i in global_indices]))
        items = [run.train_items[i] for i in indices or global_indices[:1]]
        last_micro = micro == config.grad_accum - 1  # DDP all-reduces the accumulated gradients once
        with nullcontext() if last_micro else accelerator.no_sync(run.prepared_model):
            with accelerator.autocast():
                loss = _batch_loss(run, items) * weight / config.grad_accum
            accelerator.backward(loss)
        step_loss += loss.detach()
        run.state.examples += len(global_indices)
    return accelerator.reduce(step_loss, reduction="mean").item()  # the global batch's loss, on every rank


def _batch_loss(run: Run, items: list) -> torch.Tensor:
    """The mean loss of one (micro-)batch: a preference objective's, the targets' (generation: the LM head on
    the target positions only) or the task's."""
    if run.objective is not None:
        return run.objective.loss(run.prepared_model, run.model, items, run.tokenizer.pad_token_id, run.device)
    batch = collate(items, run.tokenizer.pad_token_id)
    labels = batch.pop("labels").to(run.device)
    inputs = {k: v.to(run.device) for k, v in batch.items()}
    if run.task.kind == "generation":
        return run.prepared_model(**inputs, target_labels=labels)
    return task_loss(run.task, run.prepared_model(**inputs), labels)


def _global_batch(run: Run, number: int) -> list[int]:
    """The training items of the `number`-th global (micro-)batch: each epoch a new seeded order."""
    epoch, index = divmod(number, run.steps_per_epoch * run.config.grad_accum)
    if epoch not in run.epoch_batches:
        run.epoch_batches = {epoch: epoch_batches(len(run.train_items), run.config.batch_size, run.config.seed,
                                                  epoch, run.lengths)}
    return run.epoch_batches[epoch][index]


def _loss_units(task, items: list[Encoded]) -> int:
    """What the task's loss is a mean over: examples, or for generation the target tokens (labels
    after the first position, as `task_loss` shifts them, that are not IGNORE_INDEX)."""
    if task.kind != "generation" or (items and isinstance(items[0], EncodedPair)):  # pairs: a mean over pairs
        return len(items)
    return sum(label != IGNORE_INDEX for item in items for label in item.label[1:])


def skip_nonfinite_step(run: Run, loss: float) -> None:
    """A NaN/inf loss: stop (the default), or with `on_nonfinite="skip"` drop the batch's gradients and
    count the step (the schedule moves on, as it would have)."""
    step = run.state.step
    if run.config.on_nonfinite != "skip":
        raise TrainingError(
            f"loss is {loss} at step {step}; the last good checkpoint (if any) is in {run.out / 'checkpoint'}. "
            f"Lower the learning rate (now {run.lr}) or pass --on-nonfinite skip"
        )
    run.log({"step": step, "skipped": "non-finite loss"})
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.state.step += 1


def optimizer_step(run: Run, loss: float) -> None:
    """Clip, update, advance the schedule; stop on a loss that explodes."""
    if run.config.max_grad_norm:
        run.accelerator.clip_grad_norm_(run.trainable, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.state.step += 1
    run.loss_window.append(loss)
    _check_explosion(run.loss_window, run.state.step - 1, run.lr)


def log_step(run: Run, loss: float, progress: _Progress) -> None:
    """The progress bar every step; metrics.jsonl every `log_every` steps and at the last one."""
    state, every = run.state, run.config.log_every
    elapsed = time.perf_counter() - run.started
    progress.update(state.step, loss, run.scheduler.get_last_lr()[0], state.examples / max(elapsed, 1e-9))
    if state.step % every == 0 or state.step == run.total_steps:
        recent = run.loss_window[-every:]
        run.log({"step": state.step, "loss": sum(recent) / len(recent), "lr": run.scheduler.get_last_lr()[0],
                 "examples_per_s": state.examples / elapsed, "seconds": elapsed,
                 **(run.objective.logged if run.objective else {})})


# ---- evaluation, summary -------------------------------------------------------------------------------
def evaluation_due(run: Run) -> bool:
    """Every `eval_every` steps, else at the end of each epoch."""
    every = run.config.eval_every or run.steps_per_epoch
    return run.state.step % every == 0


def evaluate_and_keep_best(run: Run) -> None:
    """Score the current weights on the eval split (split over the ranks); save the delta when it is the best."""
    step = run.evaluated_at = run.state.step
    eval_started = time.perf_counter()
    with full_parameters(run.model):  # FSDP: the whole model on every rank while it evaluates and saves
        try:
            metrics = evaluate_sharded(run.model, run.tokenizer, run.task, run.eval_examples, run.max_length,
                                       run.rank, run.world) if run.objective is None else run.objective.evaluate(
                run.prepared_model, run.model, run.eval_items, run.tokenizer.pad_token_id, run.device,
                run.config.batch_size)
        except Exception as error:  # the trained delta is saved first: an evaluation error must not lose it
            raise TrainingError(f"evaluating step {step} failed ({type(error).__name__}: {error}); "
                                f"{_save_unscored_delta(run)}") from error
        run.state.eval_seconds += time.perf_counter() - eval_started
        # seconds: since training started, evaluations included; eval_seconds: the evaluations' share
        run.log({"step": step, "eval": metrics, "seconds": round(time.perf_counter() - run.started, 2),
                 "eval_seconds": round(run.state.eval_seconds, 2)})
        run.model.train()
        score = metrics[run.main_metric]  # the same on every rank: so are `best` and the decision to save
        if run.state.best is None or score > run.state.best:
            run.state.best, run.state.best_step = score, step
            if run.is_main:
                run.model.save_delta(run.out / RUN_DELTA)
    run.last_metrics = metrics


def _save_unscored_delta(run: Run) -> str:
    """Save the current delta, which could not be scored: in OUT/delta when no scored delta is there, else in
    OUT/last-delta (OUT/delta keeps the best scored one). Returns where, as a sentence."""
    kept = run.out / ("delta" if run.state.best_step is None else "last-delta")
    if run.is_main:
        run.model.save_delta(kept)
    best = f"; the best scored delta (step {run.state.best_step}) is in {run.out / 'delta'}" \
        if run.state.best_step is not None else ""
    return f"the delta of step {run.state.step}, not scored, is saved in {kept}{best}"


def write_summary(run: Run) -> dict[str, Any]:
    """OUT/summary.json (rank 0), returned on every rank once the run folder is complete."""
    state = run.state
    counts = run.model.report(print_table=False)
    # One definition whether or not the last step fell on an evaluation: train_seconds is the time of the
    # training steps alone, eval_seconds that of every evaluation (the final one included), seconds both.
    seconds = time.perf_counter() - run.started
    train_seconds = seconds - state.eval_seconds
    summary = {
        "task": run.task.name, "method": run.config.method, "model": run.config.model, "steps": state.step,
        "examples_seen": state.examples, "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(state.eval_seconds, 2), "seconds": round(seconds, 2),
        "examples_per_s": round(state.examples / max(train_seconds, 1e-9), 2),
        "final": run.last_metrics, "best": {run.main_metric: state.best, "step": state.best_step},
        "trainable_parameters": counts.trainable, "head_parameters": counts.head_parameters, "learning_rate": run.lr,
        "lr_ratio": run.config.lr_ratio,
        "delta": str(run.out / RUN_DELTA), "peak_memory_mb": round(peak_memory_mb(), 1),
        "device": str(run.device), "threads": torch.get_num_threads(), "processes": run.world,
        "precision": run.precision,
    }
    if run.is_main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    run.accelerator.wait_for_everyone()  # on any rank, train() returns once the run folder is complete
    return summary


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA's max allocated on a GPU, else the peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _check_explosion(losses: list[float], step: int, lr: float) -> None:
    """Report a loss that explodes (x20 its early level) instead of silently training through it."""
    if len(losses) >= 20:
        early = sorted(losses[:10])[5]
        recent = sum(losses[-5:]) / 5
        if early > 0 and recent > 20 * early:
            raise TrainingError(
                f"loss exploded at step {step}: {recent:.3g} vs {early:.3g} early on; "
                f"lower the learning rate (now {lr})"
            )


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- checkpoints -------------------------------------------------------------------------------
def save_checkpoint(path: Path, model: DeltaModel, optimizer, scheduler, state: dict, is_main: bool = True) -> None:
    """Delta + optimizer + scheduler + every rank's RNG + data position, written atomically by rank 0.
    Every rank calls it: under FSDP the delta and the optimizer state are gathered from the shards."""
    from accelerate.utils import gather_object
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # keyed by parameter names, complete (not this rank's shard): resumable with another number of processes
    optimizer_state = get_optimizer_state_dict(
        model, getattr(optimizer, "optimizer", optimizer),  # accelerate's wrapper -> the torch optimizer
        options=StateDictOptions(full_state_dict=True, cpu_offload=launched()),  # cpu_offload: on rank 0 only
    )
    rng_states = gather_object([torch.get_rng_state()])  # dropout masks differ per rank
    with full_parameters(model):  # a copy: FSDP frees the gathered parameters when the block ends
        # what the optimizer updates: the delta, or what it is folded from (prefix tuning's MLP)
        delta = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.trained_parameters().items()}
    if not is_main:
        return
    with atomic_folder(path) as tmp:
        save_file(delta, tmp / "delta.safetensors")
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "torch_rng": rng_states, "python_rng": random.getstate()},
            tmp / "training_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state) + "\n")


def load_checkpoint(path: Path, model: DeltaModel, optimizer, scheduler, rank: int = 0) -> dict:
    """Every rank reads the whole checkpoint and keeps what is its own (its shards, its RNG)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensors = load_file(path / "delta.safetensors")
    targets = model.trained_parameters()  # what the optimizer state belongs to (prefix tuning: its MLP)
    if set(tensors) != set(targets):
        raise TrainingError(f"checkpoint {path} does not match this model/method; start without --resume")
    with torch.no_grad():
        for key, tensor in targets.items():
            value = tensors[key].to(tensor.device)
            if isinstance(tensor, DTensor):  # FSDP: this rank's shard of the saved tensor
                value = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None)
            tensor.copy_(value)
    # our own file, read with the safe loader (tensors and plain containers only)
    saved = torch.load(path / "training_state.pt", weights_only=True)
    set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), saved["optimizer"],
                             options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    rng_states = saved["torch_rng"]
    torch.set_rng_state(rng_states[rank] if rank < len(rng_states) else rng_states[0])
    random.setstate(_as_tuple(saved["python_rng"]))
    return json.loads((path / "state.json").read_text())


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


class _Progress:
    """Steps with loss, learning rate, examples/s and ETA: a bar on a terminal, plain lines elsewhere
    (`progress.ProgressDisplay`); nothing when `enabled` is False (compare's cells, other ranks)."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.display = ProgressDisplay("step", total, start=start) if enabled else None

    def update(self, step: int, loss: float, lr: float, speed: float) -> None:
        if self.display:
            self.display.update(step, f"loss {loss:.4f} lr {lr:.2e} {speed:.1f} ex/s")

    def close(self) -> None:
        if self.display:
            self.display.close()
