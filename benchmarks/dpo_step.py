"""Step time of a DPO step on SmolLM2-135M + LoRA: the reference in the same forward pass vs a second pass.

    OMP_NUM_THREADS=1 python benchmarks/dpo_step.py [--steps 6] [--pairs 8] [--out runs/dpo-step.json]

The same LoRA model (r=8, alpha=16 on q_proj/v_proj, the E2E table's recipe) and the same batches of E2E
preference pairs (`e2e_pairs.preference_pairs`, as benchmarks/dpo_e2e.py writes them: prompt = the MR as
`deltatune train --task e2e` shows it; chosen = a human reference; rejected = that reference with one slot value
swapped for another value of the same slot, seeded; $DELTATUNE_DATA or the dataset hub) go through
`training.preference.PreferenceObjective.loss` + backward in two ways, taking turns step by step so that the
machine's load hits both alike:

- one-pass: 4n rows in one mixed forward (2n under the LoRA task, 2n under "base"), backward through all 4n;
- two-pass: 2n rows under the LoRA task with gradients, then the same 2n rows with the delta off under
  `torch.no_grad()` (what peft-based trainers do with `disable_adapter()`), backward through 2n;
- trl: TRL's `DPOTrainer` (its `compute_loss`, then backward) on a peft LoRA with the same r/alpha/targets and
  the same LoRA weights, on its own copy of SmolLM2, the same n pairs per step (`--no-trl`: left out).

The variants take turns, each first in turn, one warm-up step not counted. Reported: the median step time of
each, their ratios to the two-pass step, and the losses (equal: the same computation).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import deltatune
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks import get_task
from deltatune.tasks.e2e_pairs import preference_pairs
from deltatune.tasks.generation import PromptFormat
from deltatune.tasks.preference import encode_pairs
from deltatune.training.preference import PreferenceObjective


def trl_trainer(rows: list[dict], tokenizer, deltatune_lora: dict[str, torch.Tensor], pairs: int, folder: str):
    """TRL's DPOTrainer over a peft LoRA (r 8, alpha 16 on q_proj/v_proj, no dropout) on a fresh SmolLM2, its
    LoRA weights copied from deltatune's (so that both compute the same loss); the reference is the base with the
    adapter disabled (TRL's default for a peft model: a second forward under no_grad)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=folder, per_device_train_batch_size=pairs, beta=0.1, max_length=128,
                       report_to=[], use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0)
    model = load_model("smollm2", "causal-lm")
    model.set_attn_implementation("eager")
    trainer = DPOTrainer(model=model, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")}
                                                          for r in rows]),
                         peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]))
    copied = 0
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if ".lora_" in name:  # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
                key = name.removeprefix("base_model.model.").replace(".default.weight", "")
                parameter.copy_(deltatune_lora[key].reshape(parameter.shape))
                copied += 1
    if copied != len(deltatune_lora):
        raise SystemExit(f"copied {copied} LoRA tensors into TRL's model, deltatune has {len(deltatune_lora)}")
    trainer.model.train()
    return trainer


def trl_step(trainer, first: int, pairs: int) -> torch.Tensor:
    """One DPO loss on rows first..first+pairs-1 of TRL's tokenized dataset, as its training step computes it."""
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(first, first + pairs)])
    return trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (16 sequences)")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's DPOTrainer out")
    parser.add_argument("--out", default="runs/dpo-step.json")
    args = parser.parse_args()
    examples = get_task("e2e").load("train", None)[2000:]  # as benchmarks/dpo_e2e.py draws them
    rows = [{**row, "where": row["swap"]} for row in preference_pairs(examples, args.pairs * (args.steps + 1), 0)]
    tokenizer = load_tokenizer("smollm2")
    pairs = encode_pairs(PromptFormat("prompt-completion"), rows, tokenizer, 128)
    torch.manual_seed(0)
    model = deltatune.attach(load_model("smollm2", "causal-lm"),
                             deltatune.LoRA(r=8, alpha=16, targets=["q_proj", "v_proj"]), task="e2e")
    with torch.no_grad():  # a policy away from the reference (B = 0 would make both passes trivially equal)
        for key, tensor in model.trained_parameters("e2e").items():
            if key.endswith("lora_B"):
                tensor.normal_(0, 0.01)
    model.base_model.set_attn_implementation("eager")  # as `deltatune train` on a CPU
    model.train()
    objectives = {"one-pass": PreferenceObjective("dpo", 0.1, "e2e", one_pass=True),
                  "two-pass": PreferenceObjective("dpo", 0.1, "e2e", one_pass=False)}
    steps = {name: (lambda batch, first, objective=objective: objective.loss(model, model, batch,
                                                                              tokenizer.pad_token_id, "cpu"))
             for name, objective in objectives.items()}
    trainer = None
    if not args.no_trl:
        with tempfile.TemporaryDirectory(prefix="dpo-step-trl-") as folder:
            trainer = trl_trainer(rows, tokenizer, {k: v.detach() for k, v in model.trained_parameters("e2e").items()},
                                  args.pairs, folder)
        steps["trl"] = lambda batch, first: trl_step(trainer, first, args.pairs)
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for step in range(args.steps + 1):  # step 0 warms up, not counted
        batch = pairs[step * args.pairs : (step + 1) * args.pairs]
        for name in names[step % len(names):] + names[: step % len(names)]:  # each variant first in turn
            model.zero_grad(set_to_none=True)
            if trainer is not None:
                trainer.model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            loss = steps[name](batch, step * args.pairs)
            loss.backward()
            elapsed = time.perf_counter() - started
            if step:
                times[name].append(elapsed)
                losses[name].append(loss.item())
        if step:
            result = report(times, losses, args)  # after every step: an interrupted run keeps what it measured
    print(json.dumps(result, indent=2))


def report(times: dict[str, list[float]], losses: dict[str, list[float]], args: argparse.Namespace) -> dict:
    """The medians, their ratios to the two-pass step and the raw numbers, written to `args.out`."""
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {f"{name}/two-pass": medians[name] / medians["two-pass"] for name in medians if name != "two-pass"}
    result = {"median_step_s": medians, "ratios": ratios, "step_times_s": times, "losses": losses,
              "pairs_per_step": args.pairs, "steps_done": len(times["two-pass"]), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "trl": None if args.no_trl else importlib.metadata.version("trl"),
              "peft": None if args.no_trl else importlib.metadata.version("peft"),
              "machine": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
