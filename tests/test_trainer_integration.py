"""transformers.Trainer training a DeltaModel (deltatune.integrations.trainer): default arguments keep the columns
the wrapped model takes, checkpoints hold the delta (no base weights), resuming gives the uninterrupted run's delta
bit for bit, the best checkpoint is reloaded at the end, save_model writes a folder load_delta reads, bf16 and
gradient checkpointing train."""

from __future__ import annotations

import inspect

import pytest
import torch
from safetensors.torch import load_file

import deltatune
from deltatune.errors import ConfigError, TrainingError
from deltatune.testing import tiny_model, tiny_tokenizer

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
from deltatune.integrations.trainer import DeltaTrainer  # noqa: E402

TEXTS = ["a charming and often affecting journey", "bleak and desperate", "the movie was great",
         "the acting was terrible"] * 6


def _classification_data():
    encoded = tiny_tokenizer()(TEXTS, padding="max_length", max_length=12)
    # "text" is a column no forward takes: Trainer drops it by the forward's signature, and must keep the others
    return datasets.Dataset.from_dict({**encoded, "label": [1, 0, 1, 0] * 6, "text": TEXTS})


def _model(seed: int = 0) -> deltatune.DeltaModel:
    torch.manual_seed(seed)  # the same base weights every time; the delta is trained or loaded over them
    return deltatune.attach(tiny_model("bert"), deltatune.LoRA(r=2))


def _args(out, **overrides):
    settings = dict(max_steps=6, save_steps=3, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
                    use_cpu=True, seed=7, logging_steps=1, disable_tqdm=True)
    return transformers.TrainingArguments(str(out), **{**settings, **overrides})


def _delta(model: deltatune.DeltaModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.task_parameters().items()}


def test_forward_signature_is_the_wrapped_models():
    model = _model()
    names = list(inspect.signature(model.forward).parameters)
    assert names[:3] == ["input_ids", "attention_mask", "token_type_ids"] and "labels" in names
    assert names[-4:] == ["tasks", "target_labels", "target_sums", "kwargs"]


def test_checkpoints_hold_the_delta_and_resume_to_the_same_delta(tmp_path):
    data = _classification_data()
    model = _model()
    before = _delta(model)
    DeltaTrainer(model=model, args=_args(tmp_path / "a"), train_dataset=data).train()
    uninterrupted = _delta(model)
    assert any(not torch.equal(before[k], uninterrupted[k]) for k in before)  # it trained (default arguments)

    checkpoint = tmp_path / "a" / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"delta.safetensors", "delta.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "trained.safetensors"}  # LoRA saves what it trains
    saved = load_file(checkpoint / "delta.safetensors")
    assert set(saved) == set(model.task_parameters())  # the delta's keys only: no base weight
    assert sum(t.numel() for t in saved.values()) == model.report(print_table=False).trainable

    resumed = _model()  # fresh LoRA init: everything it ends with comes from the checkpoint and the resumed steps
    DeltaTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=data).train(
        resume_from_checkpoint=str(checkpoint))
    for key, value in _delta(resumed).items():
        assert torch.equal(value, uninterrupted[key]), key  # bitwise: optimizer, scheduler, RNG and data order restored


def test_best_checkpoint_reloaded_and_save_model_is_a_delta_folder(tmp_path):
    data = _classification_data()
    evaluations = []

    def first_is_best(_prediction):  # a metric that makes the first evaluation (step 2) the best one
        evaluations.append(1)
        return {"order": -len(evaluations)}

    model = _model()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, save_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="order", greater_is_better=True)
    trainer = DeltaTrainer(model=model, args=args, train_dataset=data, eval_dataset=data.select(range(4)),
                           compute_metrics=first_is_best)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2") and len(evaluations) == 3
    best = load_file(tmp_path / "checkpoint-2" / "delta.safetensors")
    last = load_file(tmp_path / "checkpoint-6" / "delta.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for key, value in _delta(model).items():
        assert torch.equal(value, best[key]), key

    trainer.save_model(str(tmp_path / "final"))
    torch.manual_seed(0)
    loaded = deltatune.load_delta(tiny_model("bert"), tmp_path / "final")
    inputs = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    assert any(p.name.startswith("checkpoint-") for p in tmp_path.iterdir())  # save_model left the checkpoints


def test_bf16_and_gradient_checkpointing_train_a_causal_lm(tmp_path):
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(TEXTS, padding="max_length", max_length=12)
    data = datasets.Dataset.from_dict({**encoded, "labels": encoded["input_ids"]})
    torch.manual_seed(0)
    model = deltatune.attach(tiny_model("llama", "causal-lm"), deltatune.LoRA(r=2))
    before = _delta(model)
    args = _args(tmp_path, max_steps=2, bf16=True, gradient_checkpointing=True, save_strategy="no")
    trainer = DeltaTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    assert model.base_model.is_activation_checkpointing
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
    # checkpointed blocks with a frozen base still pass gradients to every LoRA matrix
    changed = [k for k, v in _delta(model).items() if k.endswith("lora_B") and not torch.equal(v, before[k])]
    assert len(changed) == len([k for k in before if k.endswith("lora_B")])


def test_refusals(tmp_path):
    with pytest.raises(ConfigError, match="trains a DeltaModel"):
        DeltaTrainer(model=tiny_model("bert"), args=_args(tmp_path))
    model = _model()
    (tmp_path / "empty").mkdir()
    trainer = DeltaTrainer(model=model, args=_args(tmp_path), train_dataset=_classification_data())
    with pytest.raises(TrainingError, match="holds no deltatune delta"):
        trainer._load_from_checkpoint(str(tmp_path / "empty"))
