"""`transformers.Trainer` training a deltatune delta: checkpoints and `save_model` hold the delta, not the base.

    trainer = DeltaTrainer(model=deltatune.attach(base, LoRA(r=8)), args=TrainingArguments("out"),
                           train_dataset=dataset, processing_class=tokenizer)
    trainer.train()                        # out/checkpoint-N: delta.safetensors + delta.json + optimizer/RNG
    trainer.save_model("out/delta")        # a delta folder: load_delta, `deltatune eval/generate/serve` read it

Why a Trainer subclass: Trainer calls `save_pretrained` only on a `PreTrainedModel` or a peft `PeftModel`
(`isinstance` in `Trainer._save`) and reloads only their files (`_load_from_checkpoint`, `_load_best_model`);
any other module has its whole `state_dict()` — base weights included — written to `model.safetensors`.
`DeltaTrainerMixin` replaces exactly those three methods, so it mixes into Trainer's subclasses too (TRL's, in
`deltatune.integrations.trl`). Everything else (data, optimizer, scheduler, RNG, DDP, bf16, gradient checkpointing)
is Trainer's own. A plain `Trainer(model=delta_model)` also trains (the forward signature Trainer reads is the
wrapped model's), but its checkpoints are full models.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.utils import find_labels

from deltatune.delta import DeltaModel
from deltatune.errors import ConfigError, TrainingError
from deltatune.formats.native import META_FILE, WEIGHTS_FILE, write_delta_into

# what the optimizer updates, where it is not what the delta saves (prefix tuning's MLP, a PiSSA task)
TRAINED_FILE = "trained.safetensors"
TRAINING_ARGS_FILE = "training_args.bin"  # transformers.trainer.TRAINING_ARGS_NAME


def save_training_delta(model: DeltaModel, folder: str | os.PathLike) -> Path:
    """The active task's delta into `folder` (beside whatever else is there), plus what the optimizer updates
    when that is not the delta itself, so that training resumes from it exactly."""
    tensors, meta = model.described_delta()
    trained = model.trained_parameters()
    same = trained.keys() == tensors.keys() and all(torch.equal(trained[key], tensors[key]) for key in trained)
    return write_delta_into(folder, tensors, meta, extra=None if same else {TRAINED_FILE: trained})


def load_training_delta(model: DeltaModel, folder: str | os.PathLike) -> None:
    """Put the parameters `save_training_delta` wrote back into the active task (resume, best checkpoint)."""
    folder = Path(folder)
    source = folder / TRAINED_FILE if (folder / TRAINED_FILE).is_file() else folder / WEIGHTS_FILE
    if not source.is_file() or not (folder / META_FILE).is_file():
        raise TrainingError(f"{folder} holds no deltatune delta ({WEIGHTS_FILE} + {META_FILE}); resume from a "
                            f"checkpoint a DeltaTrainer wrote, or start without resume_from_checkpoint")
    tensors = load_file(source)
    targets = model.trained_parameters()
    if tensors.keys() != targets.keys():
        missing, unexpected = sorted(targets.keys() - tensors.keys()), sorted(tensors.keys() - targets.keys())
        raise TrainingError(f"{source} does not fit task {model.active_task!r}: missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}; resume with the method and settings the checkpoint was made with")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(tensors[key].to(target.device, target.dtype))
    for component in model.components().values():
        if model.active_task in component.tasks:
            component.on_load(model.active_task)


class DeltaTrainerMixin:
    """Put before a `transformers.Trainer` subclass: `class MyTrainer(DeltaTrainerMixin, SomeTrainer)`.
    `model=` must be a `DeltaModel` with its task active; `self.delta_model` is it."""

    def __init__(self, model: DeltaModel, *args, **kwargs):
        if not isinstance(model, DeltaModel):
            raise ConfigError(f"{type(self).__name__} trains a DeltaModel (deltatune.attach(model, config)), not "
                              f"{type(model).__name__}; for a plain model use transformers.Trainer")
        if model.active_task is None:
            raise ConfigError(f"the DeltaModel has no active task to train (tasks: {model.tasks}); call use(task)")
        self.delta_model = model
        super().__init__(self._trainer_model(model), *args, **kwargs)
        if self.args.label_names is None:  # Trainer reads them off the class's forward: DeltaModel's names none
            self.label_names = find_labels(type(model.base_model))

    def _trainer_model(self, model: DeltaModel) -> torch.nn.Module:
        """The module the Trainer runs (TRL's trainers take the wrapped model: see deltatune.integrations.trl)."""
        return model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's `_save` for a DeltaModel: the delta (atomic files) instead of the model's state dict."""
        if not self.args.should_save:
            return
        output_dir = Path(output_dir if output_dir is not None else self.args.output_dir)
        save_training_delta(self.delta_model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, output_dir / TRAINING_ARGS_FILE)  # as Trainer does; deltatune never reads it

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        load_training_delta(self.delta_model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_training_delta(self.delta_model, self.state.best_model_checkpoint)


class DeltaTrainer(DeltaTrainerMixin, Trainer):
    """`transformers.Trainer` whose checkpoints and `save_model` folders are deltatune deltas."""
