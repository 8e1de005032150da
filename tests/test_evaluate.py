"""Generation scoring: `generate_texts` is plain greedy decoding of the training prompt, cut at the first newline."""

from __future__ import annotations

import torch
from conftest import make_model

from deltatune.delta import DeltaModel
from deltatune.evaluate import generate_texts
from deltatune.tasks.generation import generation_prompt
from deltatune.testing import tiny_tokenizer


def greedy_by_hand(model, tokenizer, source: str, max_new_tokens: int) -> str:
    ids = tokenizer(generation_prompt(source), add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(max_new_tokens):  # no cache: the whole sequence every step
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
            if next_id.item() == tokenizer.eos_token_id:
                break
    text = tokenizer.decode(ids[0, start:], skip_special_tokens=True)
    return text.strip().split("\n")[0].strip()


def test_generate_texts_is_greedy_and_keeps_the_first_line():
    tokenizer = tiny_tokenizer()
    sources = ["name[The Eagle], eatType[coffee shop]", "area[riverside]", "food[French], near[Burger King]"]
    for seed in range(3):  # a few random models: some continuations contain a newline, some do not
        model = DeltaModel(make_model("llama", seed=seed, kind="causal-lm"))
        texts = generate_texts(model, tokenizer, sources, batch_size=1, max_new_tokens=12)
        assert texts == [greedy_by_hand(model, tokenizer, s, 12) for s in sources]
