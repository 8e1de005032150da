"""TRL training a deltatune delta (deltatune.integrations.trl): SFTTrainer on chat messages with assistant-only loss,
DPOTrainer with the base-with-the-delta-off as its reference (no second model)."""

from __future__ import annotations

import pytest
import torch

import deltatune
from deltatune.errors import ConfigError
from deltatune.testing import tiny_model, tiny_tokenizer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
from deltatune.integrations.trl import DeltaDPOTrainer, DeltaSFTTrainer  # noqa: E402

# ChatML-like, with the {% generation %} markers that assistant-only loss reads the assistant's tokens from
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<s>assistant\n{% generation %}{{ m['content'] }}</s>"
    "{% endgeneration %}\n{% else %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CONVERSATION = [{"role": "user", "content": "the movie was great"}, {"role": "assistant", "content": "positive"}]
SETTINGS = dict(per_device_train_batch_size=1, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                disable_tqdm=True, seed=3, bf16=False)  # TRL turns bf16 on by default: exact comparisons here


def _lm(seed: int = 0):
    torch.manual_seed(seed)
    return tiny_model("llama", "causal-lm")


def _tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mean_loss(model, input_ids, labels) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([input_ids]), labels=torch.tensor([labels])).loss.item()


def test_sft_trains_the_delta_on_the_assistant_tokens_only(tmp_path):
    tokenizer = _tokenizer()
    model = deltatune.attach(_lm(), deltatune.LoRA(r=2))
    data = datasets.Dataset.from_dict({"messages": [CONVERSATION] * 4})
    args = trl.SFTConfig(str(tmp_path), max_steps=2, save_steps=2, assistant_only_loss=True, **SETTINGS)
    trainer = DeltaSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()
    first_loss = trainer.state.log_history[0]["loss"]

    # step 1 runs with LoRA's B = 0: the plain base's loss on the assistant's tokens, found here without TRL
    encoded = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    ids, mask = encoded["input_ids"], encoded["assistant_masks"]
    assert 0 < sum(mask) < len(ids)
    assistant_only = _mean_loss(_lm(), ids, [t if m else -100 for t, m in zip(ids, mask, strict=True)])
    whole = _mean_loss(_lm(), ids, ids)
    assert first_loss == pytest.approx(assistant_only, rel=1e-4) and abs(assistant_only - whole) > 1e-2

    saved = tmp_path / "checkpoint-2"
    assert {"delta.safetensors", "delta.json"} <= {p.name for p in saved.iterdir()}
    assert not (saved / "model.safetensors").exists()
    loaded = deltatune.load_delta(_lm(), saved)
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.equal(loaded(input_ids=x).logits, model(input_ids=x).logits)
        assert not torch.equal(loaded(input_ids=x).logits, _lm()(input_ids=x).logits)  # it trained


def test_dpo_reference_is_the_base_with_the_delta_off(tmp_path):
    tokenizer = tiny_tokenizer()
    model = deltatune.attach(_lm(), deltatune.LoRA(r=2))
    with torch.no_grad():  # a delta that already changes the model: reference (base) and policy differ from step 0
        for key, tensor in model.task_parameters().items():
            if key.endswith("lora_B"):
                tensor.normal_(0, 0.5)
    data = datasets.Dataset.from_dict({"prompt": ["Review: the movie was great Sentiment:"] * 2,
                                       "chosen": [" positive"] * 2, "rejected": [" negative"] * 2})
    args = trl.DPOConfig(str(tmp_path), max_steps=1, save_strategy="no", **SETTINGS)
    before = {k: v.detach().clone() for k, v in model.task_parameters().items()}
    trainer = DeltaDPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    assert trainer.ref_model is None and model.active_task == "default"

    row = trainer.train_dataset[0]
    ids = row["prompt_ids"] + row["chosen_ids"]
    labels = [-100] * len(row["prompt_ids"]) + row["chosen_ids"]
    chosen = len(row["chosen_ids"])
    # summed log-probability of the chosen completion = -(mean loss) * its length (labels shift by one inside)
    base = -_mean_loss(_lm(), ids, labels) * chosen
    policy = -_mean_loss(model, ids, labels) * chosen
    assert row["ref_chosen_logps"] == pytest.approx(base, rel=1e-4) and abs(base - policy) > 1e-2
    trainer.train()
    assert any(not torch.equal(v, before[k]) for k, v in model.task_parameters().items())


def test_methods_trl_cannot_run_are_refused(tmp_path):
    model = deltatune.attach(_lm(), deltatune.PromptTuning(length=2))
    data = datasets.Dataset.from_dict({"messages": [CONVERSATION]})
    with pytest.raises(ConfigError, match="rewrite the model's inputs"):
        DeltaSFTTrainer(model=model, args=trl.SFTConfig(str(tmp_path), **SETTINGS), train_dataset=data,
                        processing_class=_tokenizer())
