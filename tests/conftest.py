"""Shared fixtures: tiny random models of every architecture, inputs that suit them, real data paths."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
import torch

from deltatune.models import tiny_model, tiny_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# tiny models run much faster on one thread (and do not suffer when the machine is busy)
torch.set_num_threads(1)

ARCHS = ["bert", "roberta", "gpt2", "llama", "t5"]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_model(arch: str, seed: int = 0, kind: str = "classification"):
    """The same tiny random model for the same (arch, seed): a 'fresh copy of the base'."""
    torch.manual_seed(seed)
    return tiny_model(arch, kind)


def make_inputs(arch: str, batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(4, 500, (batch, length), generator=generator)
    input_ids[:, -1] = 1  # T5 classification reads the (single) </s>; harmless elsewhere
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} is not present")
    return SHARED_DATA


WORDS_POSITIVE = ["great", "charming", "moving", "funny"]
WORDS_NEGATIVE = ["terrible", "bleak", "weak", "desperate"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random BERT classifier and tokenizer saved as a model folder."""
    path = tmp_path / "tiny-bert"
    make_model("bert").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def sentiment_csv(tmp_path):
    """128 short reviews whose label is given by one sentiment word (learnable by a tiny model)."""
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(128):
            label = i % 2
            words = WORDS_POSITIVE if label else WORDS_NEGATIVE
            word = words[int(torch.randint(len(words), (1,), generator=generator))]
            writer.writerow([f"the movie was {word} .", "positive" if label else "negative"])
    return path
