"""Shared fixtures: tiny random models of every architecture, inputs that suit them, real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deltatune.models import tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

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
