"""Prompt tuning: where the prompt goes, labels and masks, padding, generation, truncation, init modes."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from conftest import make_inputs, make_model

import deltatune
from deltatune.cli import main as cli_main
from deltatune.testing import tiny_tokenizer

P = 4  # prompt length in these tests


def attach(arch: str, kind: str = "classification", **options) -> deltatune.DeltaModel:
    return deltatune.attach(make_model(arch, kind=kind), deltatune.PromptTuning(length=P, **options), task="p")


def prompt_of(model) -> torch.Tensor:
    return model.task_parameters("p")["prompt_embeddings"]


def base_kwargs(model) -> dict:
    """The keyword arguments the base model receives from DeltaModel.forward (captured by a hook)."""
    seen = {}
    handle = model.base_model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    return seen, handle


def test_prompt_goes_right_after_cls_for_bert():
    model = attach("bert")
    inputs = make_inputs("bert")
    seen, _ = base_kwargs(model)
    embeddings = model.base_model.bert.embeddings
    embeddings.register_forward_pre_hook(lambda m, a, kw: seen.update(embedded=kw["inputs_embeds"]),
                                         with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        words = embeddings.word_embeddings(inputs["input_ids"])
    embeds = seen["embedded"]  # what BertEmbeddings gets, (B, 1 + P + n - 1, d): [CLS], prompt, the rest
    assert embeds.shape[1] == inputs["input_ids"].shape[1] + P
    assert torch.equal(embeds[:, 0], words[:, 0])  # the pooler/classifier still reads [CLS]
    assert torch.equal(embeds[:, 1 : 1 + P], prompt_of(model).detach().expand(3, -1, -1))
    assert torch.equal(embeds[:, 1 + P :], words[:, 1:])
    assert torch.equal(seen["attention_mask"], torch.ones(3, 9 + P, dtype=torch.long))


def test_token_type_ids_are_extended():
    model = attach("bert")
    inputs = make_inputs("bert")
    inputs["token_type_ids"] = torch.cat([torch.zeros(3, 5), torch.ones(3, 4)], 1).long()
    seen, _ = base_kwargs(model)
    with torch.no_grad():
        model(**inputs)
    assert seen["token_type_ids"].tolist() == [[0] * (5 + P) + [1] * 4] * 3


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_decoder_labels_get_minus_100_at_the_prompt(arch):
    model = attach(arch, kind="causal-lm")
    inputs = make_inputs(arch)
    labels = inputs["input_ids"].clone()
    seen, _ = base_kwargs(model)
    outputs = model(**inputs, labels=labels)
    assert torch.equal(seen["labels"][:, :P], torch.full((3, P), -100))
    assert torch.equal(seen["labels"][:, P:], labels)
    assert torch.equal(seen["inputs_embeds"][:, :P], prompt_of(model).detach().expand(3, -1, -1))
    assert outputs.logits.shape[1] == 9 + P
    # the model's own loss covers the real tokens; as in PEFT, the prompt's last position predicts the first
    expected = torch.nn.functional.cross_entropy(outputs.logits[:, P - 1 : -1].reshape(-1, 512), labels.reshape(-1))
    torch.testing.assert_close(outputs.loss, expected)
    outputs.loss.backward()
    assert prompt_of(model).grad is not None and prompt_of(model).grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "roberta"])
def test_classification_is_right_with_padding(arch):
    """A right-padded row gives the logits of the same row alone: decoders pool the last real token."""
    model = attach(arch)
    long, short = torch.randint(4, 500, (1, 7)), torch.randint(4, 500, (1, 4))
    batch = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], 1)])
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        padded = model(input_ids=batch, attention_mask=mask).logits
        alone = torch.cat([model(input_ids=long).logits, model(input_ids=short).logits])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)


def test_t5_prompt_goes_to_the_encoder_only():
    model = attach("t5")
    inputs = make_inputs("t5")
    seen, _ = base_kwargs(model)
    with torch.no_grad():
        model(**inputs)
    assert seen["encoder_outputs"].last_hidden_state.shape[1] == 9 + P
    assert seen["attention_mask"].shape[1] == 9 + P
    assert torch.equal(seen["input_ids"], inputs["input_ids"])  # the decoder and the <eos> pooling read these

    seq2seq = attach("t5", kind="seq2seq")
    seen, _ = base_kwargs(seq2seq)
    labels = torch.randint(4, 500, (3, 9))  # decoder targets, as long as the input by chance: left alone
    seq2seq(**inputs, labels=labels).loss.backward()
    assert torch.equal(seen["labels"], labels) and prompt_of(seq2seq).grad.abs().sum() > 0


def greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through DeltaModel.forward, the whole sequence each step (no cache)."""
    for _ in range(steps):
        with torch.no_grad():
            next_token = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], 1)
    return ids


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_a_prompt(arch):
    model = attach(arch, kind="causal-lm")
    with torch.no_grad():
        prompt_of(model).mul_(20)  # a prompt that visibly steers the tiny model
    ids = torch.randint(4, 500, (1, 6), generator=torch.Generator().manual_seed(3))
    options = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    generated = model.generate(input_ids=ids, **options)
    assert torch.equal(generated, greedy(model, ids, 5))  # input ids + new tokens, like HF generate
    # a left-padded batch: each row as if alone, scores included
    short = ids[:, :3]
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), ids])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = model.generate(input_ids=batch, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                         **options)
    alone = model.generate(input_ids=short, output_scores=True, return_dict_in_generate=True, **options)
    assert torch.equal(out.sequences[0, 6:], alone.sequences[0, 3:])
    torch.testing.assert_close(out.scores[0][0], alone.scores[0][0], atol=1e-4, rtol=0)
    model.use("base")
    assert not torch.equal(model.generate(input_ids=ids, **options), generated)


def test_generate_seq2seq_with_a_prompt():
    model = attach("t5", kind="seq2seq")
    with torch.no_grad():
        prompt_of(model).mul_(20)
    ids = make_inputs("t5")["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=torch.zeros(3, 1, dtype=torch.long)).logits[:, -1]
    torch.testing.assert_close(out.scores[0], expected, atol=1e-4, rtol=0)


def test_overlong_input_is_truncated_with_a_warning():
    model = attach("bert")  # 128 positions: 124 are left beside the prompt
    ids = torch.randint(4, 500, (2, 130))
    with pytest.warns(UserWarning, match=r"130 tokens does not fit.*128 positions.*prompt takes 4.*keeping 124"):
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(logits, model(input_ids=ids[:, :124]).logits)

    strict = attach("gpt2", truncate=False)
    with pytest.raises(deltatune.DeltaTuneError, match=r"shorten inputs to 124 tokens"):
        strict(input_ids=ids)


def test_generate_truncates_to_leave_room_for_new_tokens():
    model = attach("gpt2", kind="causal-lm")
    ids = torch.randint(4, 500, (1, 126))
    with pytest.warns(UserWarning, match="plus 10 new tokens.*keeping 114"):
        out = model.generate(input_ids=ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 136) and torch.equal(out[:, :126], ids)


def test_init_from_text_uses_the_texts_embeddings():
    tokenizer = tiny_tokenizer()
    config = deltatune.PromptTuning.from_text("positive", tokenizer, length=P)
    ids = tokenizer("positive", add_special_tokens=False)["input_ids"]
    assert config.init_token_ids == ids and len(ids) < P  # repeated to fill P
    model = deltatune.attach(make_model("gpt2"), config, task="p")
    embedding = model.get_input_embeddings().weight
    assert torch.equal(prompt_of(model), embedding[(ids * P)[:P]])
    short = deltatune.attach(make_model("gpt2"), deltatune.PromptTuning(length=2, init="text", init_token_ids=ids))
    assert torch.equal(short.task_parameters()["prompt_embeddings"], embedding[ids[:2]])  # cut to length


def test_vocab_and_random_init():
    model = attach("llama", init="vocab")
    embedding = model.get_input_embeddings().weight
    rows = prompt_of(model)
    assert all((embedding == row).all(-1).any() for row in rows)  # each one a vocabulary embedding
    random = deltatune.attach(make_model("llama"), deltatune.PromptTuning(length=256), task="p")
    values = random.task_parameters("p")["prompt_embeddings"]
    assert not any((embedding == row).all(-1).any() for row in values)
    assert abs(values.std().item() / embedding.std().item() - 1) < 0.1  # scaled like the embedding matrix


def test_text_init_needs_token_ids():
    with pytest.raises(ValueError, match="from_text"):
        deltatune.PromptTuning(init="text")
    with pytest.raises(deltatune.DeltaTuneError, match="init_token_ids"):
        deltatune.attach(make_model("bert"), deltatune.PromptTuning(init="text", init_text="hello"))


def test_prompt_cannot_be_merged_and_base_is_untouched():
    base = make_model("roberta")
    inputs = make_inputs("roberta")
    with torch.no_grad():
        expected = base(**inputs).logits
    model = deltatune.attach(base, deltatune.PromptTuning(length=P), task="p")
    with pytest.raises(deltatune.MergeError, match="cannot be merged"):
        model.merge()
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, expected)  # the prompt acts from the start
        assert torch.equal(model.use("base")(**inputs).logits, expected)
    with pytest.raises(deltatune.DeltaTuneError, match="position_ids"):
        model.use("p")(**inputs, position_ids=torch.arange(9)[None])


def test_params_table_shows_the_prompt_row():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["params", "--arch", "roberta-large"]) == 0
    row = next(line for line in out.getvalue().splitlines() if line.startswith("Prompt tuning (length 20)"))
    assert "20,480" in row  # 20 x 1024
