"""TRL's SFTTrainer trains a deltatune LoRA on SmolLM2-135M-Instruct's chat template with the loss on the assistant
turns only (the README's SFTTrainer example), then lists what its checkpoint holds.

    DELTATUNE_DATA=../shared/data OMP_NUM_THREADS=1 python examples/trl_sft_smollm2.py [--steps 4] [--out runs/sft]

The conversations: an E2E meaning representation as the user turn, its reference sentence as the assistant turn.
SmolLM2's template has no {% generation %} markers (where assistant-only loss finds the assistant's tokens) and
TRL has no training version of it, so the example sets the same template with them: it renders the same text.
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

import deltatune
from deltatune.integrations.trl import DeltaSFTTrainer
from deltatune.models import resolve_model_path

# SmolLM2-135M-Instruct's own chat template, with {% generation %} around each assistant reply and its <|im_end|>
TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def e2e_conversations(rows: int) -> list[list[dict]]:
    with open(Path(os.environ.get("DELTATUNE_DATA", "../shared/data")) / "e2e" / "devset.csv") as handle:
        return [[{"role": "user", "content": f"Describe this restaurant: {row['mr']}"},
                 {"role": "assistant", "content": row["ref"]}]
                for row, _ in zip(csv.DictReader(handle), range(rows), strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default="runs/sft")
    options = parser.parse_args()
    torch.set_num_threads(1)
    # ---- the README example ----
    path = resolve_model_path("smollm2")
    tokenizer, base = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    tokenizer.chat_template = TRAINING_TEMPLATE
    model = deltatune.attach(base, deltatune.LoRA(r=8), task="e2e-chat")
    data = Dataset.from_dict({"messages": e2e_conversations(32)})
    args = SFTConfig(options.out, max_steps=options.steps, save_steps=options.steps // 2, assistant_only_loss=True,
                     per_device_train_batch_size=4, learning_rate=2e-4, bf16=False, report_to=[], logging_steps=1)
    trainer = DeltaSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(f"{options.out}/delta")
    # ----
    batch = next(iter(trainer.get_train_dataloader()))
    kept = (batch["labels"] != -100).sum().item()
    print(f"one batch: {kept} of {batch['attention_mask'].sum().item()} tokens carry the loss (the assistant's)")
    for folder in sorted(Path(options.out).glob("checkpoint-*")) + [Path(options.out) / "delta"]:
        sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
        print(f"{folder}: {sum(sizes.values()) / 1e6:.2f} MB in {len(sizes)} files; "
              + ", ".join(f"{name} {size / 1e6:.2f} MB" for name, size in sizes.items() if size > 10_000))


if __name__ == "__main__":
    main()
