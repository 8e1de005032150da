"""TRL's `SFTTrainer` and `DPOTrainer` training a deltatune delta (TRL is pinned in requirements.txt).

    trainer = DeltaSFTTrainer(model=deltatune.attach(lm, LoRA(r=8)), args=SFTConfig("out", assistant_only_loss=True),
                              train_dataset=messages_dataset, processing_class=tokenizer)
    trainer = DeltaDPOTrainer(model=delta_model, args=DPOConfig("out"), train_dataset=preferences,
                              processing_class=tokenizer)  # reference: the same base with the delta off

What TRL asks of its model and how a DeltaModel answers:
- TRL treats a model as peft's only by `isinstance(model, PeftModel)` (`accelerate.utils.is_peft_model`); otherwise
  it patches the model's own forward with its fused LM head (`trl.trainer.utils.add_fused_lm_head`), which runs
  `model.base_model` as the transformer backbone. So TRL is given the model the DeltaModel wraps — a plain
  transformers model whose layers carry the delta (the active task runs in them) — and the Trainer's saves and
  loads go through the DeltaModel (`DeltaTrainerMixin`). Methods that rewrite the model's inputs instead (prompt
  and prefix tuning) run only through `DeltaModel.forward`, so they are refused here.
- DPO's reference with no `ref_model`: for a peft model TRL disables the adapter (`model.disable_adapter()`); for
  any other model it loads a second copy. Here the reference is the base with the delta off
  (`DeltaModel.disable_adapter()`), computed once before training (`precompute_ref_log_probs`, set here): the
  base is frozen, so it is the reference of every step, and no second model is loaded.
"""

from __future__ import annotations

from torch import nn
from trl import DPOTrainer, SFTTrainer

from deltatune.core.component import DeltaComponent
from deltatune.delta import DeltaModel
from deltatune.errors import ConfigError
from deltatune.integrations.trainer import DeltaTrainerMixin


def wrapped_for_trl(model: DeltaModel) -> nn.Module:
    """The transformers model inside `model`, which TRL runs; refused where the delta would not run in it."""
    rewriting = {model.task_info[task]["method"] for c in model._input_components() for task in c.tasks}
    if rewriting:
        raise ConfigError(f"{sorted(rewriting)} rewrite the model's inputs in DeltaModel.forward, which TRL's fused "
                          f"LM head bypasses; train them with `deltatune train` or DeltaTrainer, or use another method")
    if isinstance(model.base_model.get_output_embeddings(), DeltaComponent):
        raise ConfigError("the delta changes the LM head, whose weight TRL's fused LM head reads directly; leave "
                          "lm_head out of the method's target modules")
    return model.base_model


class DeltaSFTTrainer(DeltaTrainerMixin, SFTTrainer):
    """`trl.SFTTrainer` whose checkpoints and `save_model` folders are deltatune deltas."""

    def _trainer_model(self, model: DeltaModel) -> nn.Module:
        return wrapped_for_trl(model)


class DeltaDPOTrainer(DeltaTrainerMixin, DPOTrainer):
    """`trl.DPOTrainer` whose reference, with no `ref_model`, is the base with the delta off (Rafailov et al. 2023,
    §4: the reference is the model before preference tuning, here the base the delta starts from)."""

    def __init__(self, model: DeltaModel, ref_model: nn.Module | None = None, args=None, *rest, **kwargs):
        if args is None:
            raise ConfigError("DeltaDPOTrainer needs args=trl.DPOConfig(output_dir=...)")
        if ref_model is None:
            if args.ld_alpha is not None:
                raise ConfigError("ld_alpha runs the reference at every step, which needs a ref_model; pass one, "
                                  "or leave ld_alpha unset for the base-with-the-delta-off reference")
            args.precompute_ref_log_probs = True
        super().__init__(model, ref_model, args, *rest, **kwargs)

    def _trainer_model(self, model: DeltaModel) -> nn.Module:
        return wrapped_for_trl(model)

    def compute_ref_log_probs(self, model, inputs):
        if self.ref_model is not None:
            return super().compute_ref_log_probs(model, inputs)
        with self.delta_model.disable_adapter():
            return super().compute_ref_log_probs(model, inputs)
