"""The training loop: one function, read top to bottom (nanoGPT-style), on `accelerate`.

    run = train(TrainConfig(model="minilm", task="sst2", method="lora", out="runs/sst2-lora"))

Same code on the CPU, one GPU (bf16 autocast) or several processes (`accelerate launch` /
`torchrun`: each rank takes its slice of every global batch, gradients are all-reduced, rank 0
logs and saves). AdamW, linear warmup then linear decay, gradient clipping and accumulation,
evaluation every N steps or each epoch, the best delta kept. Checkpoints hold the delta, optimizer,
scheduler, RNG states and data position, so `resume=True` ends with exactly the delta of an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from deltatune.data import collate, encode, epoch_batches, max_model_length
from deltatune.delta import DeltaModel, attach
from deltatune.errors import DeltaTuneError
from deltatune.evaluate import evaluate, task_loss
from deltatune.io import atomic_folder
from deltatune.registry import method_entry

# Per-method default learning rates (AdamW), as commonly used for each method; override with --lr.
DEFAULT_LEARNING_RATES = {
    "full": 2e-5,  # BERT/RoBERTa fine-tuning (Devlin et al. 2019; Liu et al. 2019)
    "lora": 5e-4,  # LoRA paper, RoBERTa-base GLUE: 4e-4 .. 5e-4
    "adapter": 1e-3,  # Houlsby et al. 2019 sweep 3e-5 .. 3e-3; 1e-3 is the usual pick
    "bitfit": 1e-3,  # BitFit paper: 1e-4 .. 1e-3 (higher than full fine-tuning)
    "prompt": 3e-2,  # prompt tuning needs large rates (Lester et al. 2021 used 0.3 with Adafactor)
}


class TrainingError(DeltaTuneError):
    """Training cannot go on (non-finite loss, exploding loss, nothing to train...)."""


@dataclass
class TrainConfig:
    model: str
    task: str
    method: str
    out: str
    method_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)  # csv/jsonl: path, columns
    data_dir: str | None = None
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    max_seconds: float | None = None  # wall-clock budget: stop after this much training time
    batch_size: int = 32
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LEARNING_RATES[method]
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    eval_every: int | None = None  # steps; None: at the end of each epoch
    eval_split: str = "dev"
    train_limit: int | None = None
    eval_limit: int | None = None
    checkpoint_every: int | None = None  # steps
    resume: bool = False
    precision: str = "fp32"  # or "bf16" (autocast)
    length_bucketing: bool = True
    log_every: int = 10
    progress: bool = True
    on_nonfinite: str = "stop"  # or "skip" the batch
    grad_checkpointing: bool = False


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(config: TrainConfig, task, tokenizer=None) -> DeltaModel:
    """Base model with the task's head, and the method attached for the task."""
    from deltatune.models import load_model

    kind = {"classification": "classification", "regression": "regression", "generation": "causal-lm"}[task.kind]
    base = load_model(config.model, kind, num_labels=task.num_labels if task.kind == "classification" else None)
    method_config = method_entry(config.method).config(**config.method_options)
    if config.method == "prompt" and getattr(method_config, "init", None) == "text" and tokenizer is not None:
        method_config.init_token_ids = tokenizer(method_config.init_text, add_special_tokens=False)["input_ids"]
    return attach(base, method_config, task=task_slug(task.name), label_names=task.label_names)


def task_slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "task"


def train(config: TrainConfig) -> dict[str, Any]:
    """Train, evaluate, keep the best delta in `out/delta`; return the run summary."""
    from accelerate import Accelerator

    from deltatune.models import load_tokenizer
    from deltatune.tasks import get_task

    accelerator = Accelerator(mixed_precision="bf16" if config.precision == "bf16" else "no")
    is_main = accelerator.is_main_process
    out = Path(config.out)
    set_seed(config.seed)

    # ---- data: tokenised once ------------------------------------------------------------------
    task = get_task(config.task, **config.task_options)
    tokenizer = load_tokenizer(config.model)
    model = build_model(config, task, tokenizer)
    if config.grad_checkpointing:
        model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.base_model.enable_input_require_grads()
    max_length = max_model_length(model, tokenizer, config.max_length)
    train_examples = task.load("train", config.data_dir, limit=config.train_limit)
    eval_examples = task.load(config.eval_split, config.data_dir, limit=config.eval_limit)
    train_items = encode(task, train_examples, tokenizer, max_length)
    lengths = [len(item.input_ids) for item in train_items] if config.length_bucketing else None

    steps_per_epoch = math.ceil(len(train_items) / config.batch_size) // config.grad_accum
    total_steps = config.max_steps or max(1, int(steps_per_epoch * config.epochs))
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_items)} training examples are fewer than one batch of {config.batch_size}")

    # ---- optimizer and schedule ----------------------------------------------------------------
    lr = config.lr or DEFAULT_LEARNING_RATES.get(config.method, 1e-3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the model has no trainable parameters")
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]  # biases and norms: no weight decay
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    warmup = int(config.warmup_ratio * total_steps)

    def schedule(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    prepared_model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    # ---- state, possibly resumed ---------------------------------------------------------------
    state = {"step": 0, "best": None, "best_step": None, "examples": 0, "train_seconds": 0.0}
    if config.resume and (out / "checkpoint").is_dir():
        state = load_checkpoint(out / "checkpoint", model, optimizer, scheduler)
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2) + "\n")
    main_metric = task.metric_names[0]

    def log(record: dict) -> None:
        if is_main:
            with open(out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")

    evaluated_at = {"step": None}

    def run_eval(step: int) -> dict[str, float]:
        evaluated_at["step"] = step
        metrics = evaluate(model, tokenizer, task, eval_examples, max_length=max_length)
        log({"step": step, "eval": metrics})
        model.train()
        score = metrics[main_metric]
        if state["best"] is None or score > state["best"]:
            state["best"], state["best_step"] = score, step
            if is_main:
                model.save_delta(out / "delta")
        return metrics

    stop = {"signal": None}

    def request_stop(signum, frame):  # SIGINT/SIGTERM: checkpoint, then exit
        stop["signal"] = signum

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)} \
        if is_main and _main_thread() else {}

    # ---- the loop ------------------------------------------------------------------------------
    progress = _Progress(total_steps, enabled=is_main and config.progress, start=state["step"])
    model.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    epoch_cache: dict[int, list[list[int]]] = {}
    last_metrics: dict[str, float] = {}
    loss_window: list[float] = []
    started = time.perf_counter() - state["train_seconds"]
    while state["step"] < total_steps:
        step = state["step"]
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for micro in range(config.grad_accum):
            global_batch = step * config.grad_accum + micro
            epoch, index = divmod(global_batch, steps_per_epoch * config.grad_accum)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: epoch_batches(len(train_items), config.batch_size, config.seed, epoch, lengths)}
            indices = epoch_cache[epoch][index][rank::world]  # this rank's slice of the global batch
            batch = collate([train_items[i] for i in indices], tokenizer.pad_token_id)
            labels = batch.pop("labels").to(device)
            with accelerator.autocast():
                outputs = prepared_model(**{k: v.to(device) for k, v in batch.items()})
                loss = task_loss(task, outputs, labels) / config.grad_accum
            accelerator.backward(loss)
            step_loss += loss.item()
            state["examples"] += len(indices) * world
        if not math.isfinite(step_loss):
            if config.on_nonfinite == "skip":
                log({"step": step, "skipped": "non-finite loss"})
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["step"] += 1
                continue
            raise TrainingError(
                f"loss is {step_loss} at step {step}; the last good checkpoint (if any) is in {out / 'checkpoint'}. "
                f"Lower the learning rate (now {lr}) or pass --on-nonfinite skip"
            )
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        state["step"] += 1
        loss_window.append(step_loss)
        _check_explosion(loss_window, step, lr)
        elapsed = time.perf_counter() - started
        progress.update(state["step"], step_loss, scheduler.get_last_lr()[0], state["examples"] / max(elapsed, 1e-9))
        if state["step"] % config.log_every == 0 or state["step"] == total_steps:
            recent = loss_window[-config.log_every :]
            log({"step": state["step"], "loss": sum(recent) / len(recent), "lr": scheduler.get_last_lr()[0],
                 "examples_per_s": state["examples"] / elapsed, "seconds": elapsed})
        end_of_epoch = state["step"] % steps_per_epoch == 0
        if (config.eval_every and state["step"] % config.eval_every == 0) or (not config.eval_every and end_of_epoch):
            last_metrics = run_eval(state["step"])
        state["train_seconds"] = time.perf_counter() - started
        due = bool(config.checkpoint_every) and state["step"] % config.checkpoint_every == 0
        if is_main and (due or stop["signal"]):
            save_checkpoint(out / "checkpoint", model, optimizer, scheduler, state)
        if config.max_seconds and state["train_seconds"] >= config.max_seconds:
            log({"step": state["step"], "stopped": f"time budget of {config.max_seconds} s reached"})
            break
        if stop["signal"]:
            progress.close()
            raise KeyboardInterrupt(f"stopped by signal {stop['signal']} at step {state['step']}; "
                                    f"checkpoint saved in {out / 'checkpoint'} (resume with --resume)")
    progress.close()
    for sig, handler in previous_handlers.items():
        signal.signal(sig, handler)

    if not last_metrics or evaluated_at["step"] != state["step"]:  # score the final weights too
        last_metrics = run_eval(state["step"])
    summary = {
        "task": task.name, "method": config.method, "model": config.model, "steps": state["step"],
        "examples_seen": state["examples"], "train_seconds": round(state["train_seconds"], 2),
        "examples_per_s": round(state["examples"] / max(state["train_seconds"], 1e-9), 2),
        "final": last_metrics, "best": {main_metric: state["best"], "step": state["best_step"]},
        "trainable_parameters": model.report(print_table=False).trainable, "learning_rate": lr,
        "delta": str(out / "delta"), "peak_memory_mb": round(peak_memory_mb(), 1),
        "device": str(device), "threads": torch.get_num_threads(),
    }
    if is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
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
def save_checkpoint(path: Path, model: DeltaModel, optimizer, scheduler, state: dict) -> None:
    """Delta + optimizer + scheduler + RNG + data position, written atomically."""
    with atomic_folder(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.task_parameters().items()},
                  tmp / "delta.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
            tmp / "training_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps(state) + "\n")


def load_checkpoint(path: Path, model: DeltaModel, optimizer, scheduler) -> dict:
    tensors = load_file(path / "delta.safetensors")
    targets = model.task_parameters()
    if set(tensors) != set(targets):
        raise TrainingError(f"checkpoint {path} does not match this model/method; start without --resume")
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(tensors[key])
    # our own file, read with the safe loader (tensors and plain containers only)
    saved = torch.load(path / "training_state.pt", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(_as_tuple(saved["python_rng"]))
    return json.loads((path / "state.json").read_text())


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


class _Progress:
    """A rich progress bar with loss, learning rate, examples/s and ETA (off when not interactive)."""

    def __init__(self, total: int, enabled: bool, start: int = 0):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, info="")

    def update(self, step: int, loss: float, lr: float, speed: float) -> None:
        if self.bar:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.4f} lr {lr:.2e} {speed:.1f} ex/s")

    def close(self) -> None:
        if self.bar:
            self.bar.stop()
