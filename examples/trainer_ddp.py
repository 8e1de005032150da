"""DeltaTrainer under DDP: 2 CPU processes (gloo) train the delta one process trains with the same global batch.

    OMP_NUM_THREADS=1 accelerate launch --cpu --num_processes 2 examples/trainer_ddp.py runs/ddp/two
    OMP_NUM_THREADS=1 python examples/trainer_ddp.py runs/ddp/one --batch 4
    python examples/trainer_ddp.py --compare runs/ddp/two/delta runs/ddp/one/delta

A tiny random Llama (deltatune.testing), LoRA r=4, 16 equal-length rows, 6 steps, a checkpoint at step 3. Two
processes with 2 rows each make the global batch of one process with 4 (the loss is averaged over the tokens of
all processes, `average_tokens_across_devices`), so the two deltas agree up to float rounding.
"""

from __future__ import annotations

import argparse
import sys

import torch
from datasets import Dataset
from transformers import TrainingArguments

import deltatune
from deltatune.integrations.trainer import DeltaTrainer
from deltatune.testing import tiny_model, tiny_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--batch", type=int, default=2, help="rows per process")
    parser.add_argument("--compare", nargs=2, metavar="DELTA")
    options = parser.parse_args()
    if options.compare:
        return compare(*options.compare)
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model("llama", "causal-lm"), deltatune.LoRA(r=4))
    ids = tiny_tokenizer()(["the movie was great , the acting was terrible"] * 16)["input_ids"]
    generator = torch.Generator().manual_seed(1)
    rows = [torch.randint(4, 500, (12,), generator=generator).tolist() for _ in ids]  # 16 rows of 12 tokens
    data = Dataset.from_dict({"input_ids": rows, "labels": rows})
    args = TrainingArguments(options.out, max_steps=6, save_steps=3, per_device_train_batch_size=options.batch,
                             learning_rate=1e-2, report_to=[], logging_steps=1, seed=0, use_cpu=True)
    # on CPUs torch.distributed runs gloo (what accelerate picks without a GPU)
    trainer = DeltaTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(f"{options.out}/delta")
    print(f"rank {args.process_index} of {args.world_size}: trained, parallel mode {args.parallel_mode.value}")


def compare(first: str, second: str) -> None:
    from safetensors.torch import load_file

    a, b = load_file(f"{first}/delta.safetensors"), load_file(f"{second}/delta.safetensors")
    largest = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(b[k].abs().max().item() for k in b)
    print(f"{len(a)} tensors; largest difference {largest:.3g} (largest value {scale:.3g})")
    sys.exit(0 if largest <= 1e-5 * max(scale, 1.0) else 1)


if __name__ == "__main__":
    main()
