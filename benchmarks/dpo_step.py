"""Step time of a DPO step on SmolLM2-135M + LoRA: the reference in the same forward pass vs a second pass.

    OMP_NUM_THREADS=1 python benchmarks/dpo_step.py [--steps 6] [--pairs 8] [--out runs/dpo-step.json]

The same LoRA model (r=8, alpha=16 on q_proj/v_proj, the E2E table's recipe) and the same batches of E2E
preference pairs (prompt = the MR as `deltatune train --task e2e` shows it; chosen = a human reference;
rejected = that reference with one slot value swapped for another value of the same slot, seeded) go through
`training.preference.PreferenceObjective.loss` + backward in two ways, taking turns step by step so that the
machine's load hits both alike:

- one-pass: 4n rows in one mixed forward (2n under the LoRA task, 2n under "base"), backward through all 4n;
- two-pass: 2n rows under the LoRA task with gradients, then the same 2n rows with the delta off under
  `torch.no_grad()` (what peft-based trainers do with `disable_adapter()`), backward through 2n.

Reported: the median step time of each, their ratio, and the losses (equal: the same computation).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import time
from pathlib import Path

import torch

import deltatune
from deltatune.models import load_model, load_tokenizer
from deltatune.tasks.generation import PromptFormat, generation_prompt
from deltatune.tasks.preference import encode_pairs
from deltatune.training.preference import PreferenceObjective

DATA = Path("/work/shared/data/e2e/devset.csv")


def parse_mr(mr: str) -> dict[str, str]:
    """"name[Aromi], food[Thai]" -> {"name": "Aromi", "food": "Thai"}."""
    return dict(re.findall(r"\s*([^\[,]+)\[([^\]]*)\]", mr))


def swapped_pairs(rows: list[dict], count: int, seed: int) -> list[dict]:
    """Preference rows: chosen = a reference, rejected = it with one slot value (present verbatim in the
    reference) replaced by another value that slot takes elsewhere in `rows`; seeded."""
    values: dict[str, set[str]] = {}
    for row in rows:
        for slot, value in parse_mr(row["mr"]).items():
            values.setdefault(slot, set()).add(value)
    rng, pairs = random.Random(seed), []
    for row in rng.sample(rows, len(rows)):
        slots = [(s, v) for s, v in parse_mr(row["mr"]).items()  # familyFriendly yes/no: not verbatim words
                 if s != "familyFriendly" and v in row["ref"] and len(values[s]) > 1]
        if not slots:
            continue
        slot, value = rng.choice(slots)
        other = rng.choice(sorted(values[slot] - {value}))
        pairs.append({"prompt": generation_prompt(row["mr"]), "chosen": " " + row["ref"],
                      "rejected": " " + row["ref"].replace(value, other, 1), "where": f"{slot}: {value}->{other}"})
        if len(pairs) == count:
            break
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step (16 sequences)")
    parser.add_argument("--out", default="runs/dpo-step.json")
    args = parser.parse_args()
    import csv

    rows = list(csv.DictReader(DATA.open()))
    tokenizer = load_tokenizer("smollm2")
    pairs = encode_pairs(PromptFormat("prompt-completion"), swapped_pairs(rows, args.pairs * (args.steps + 1), 0),
                         tokenizer, 128)
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
    times: dict[str, list[float]] = {name: [] for name in objectives}
    losses: dict[str, list[float]] = {name: [] for name in objectives}
    for step in range(args.steps + 1):  # step 0 warms up, not counted
        batch = pairs[step * args.pairs : (step + 1) * args.pairs]
        for name, objective in (objectives.items() if step % 2 else reversed(objectives.items())):
            model.zero_grad(set_to_none=True)
            started = time.perf_counter()
            loss = objective.loss(model, model, batch, tokenizer.pad_token_id, "cpu")
            loss.backward()
            elapsed = time.perf_counter() - started
            if step:
                times[name].append(elapsed)
                losses[name].append(loss.item())
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"median_step_s": medians, "ratio_one_over_two": medians["one-pass"] / medians["two-pass"],
              "step_times_s": times, "losses": losses, "pairs_per_step": args.pairs, "steps": args.steps,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()
              or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
