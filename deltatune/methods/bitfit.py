"""BitFit: train only the bias terms (Ben Zaken et al. 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

In a transformer layer the biases are b_q, b_k, b_v (Q = W_q x + b_q, ...), the attention output b_m1,
the FFN's b_m2 and b_m3, and the LayerNorm shifts b_LN1, b_LN2 (not the gains g). BitFit trains
exactly these (plus the task head) and freezes every weight matrix.

deltatune keeps the pretrained bias b frozen and trains a per-task shift Δb, so the layer computes

    y = W x + (b + Δb)        (LayerNorm: y = g ⊙ (x - μ)/σ + (b + Δb))

which is the same function and the same gradient as training b itself, but leaves the base model
untouched so several tasks can share it; `merge` folds Δb into b. Δb starts at zero (step 0 = base).
Models without biases (Llama, T5) have nothing to train: `add_missing=True` adds zero-initialised
biases to their linear layers instead (not to RMSNorms, whose forward has no bias to fold Δb into).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.core.architectures import (
    LINEAR_TYPES,
    in_transformer_block,
    modules_not_returning_width,
    output_features,
    unwrap,
)
from deltatune.core.component import DeltaComponent, TaskState, float_reference
from deltatune.errors import TargetError


@dataclass
class BitFit:
    """BitFit settings. `subset` limits training to biases of modules whose names end with one of the
    given suffixes — e.g. ["query", "intermediate.dense"], the paper's best two-bias subset (section 4)."""

    subset: list[str] | None = field(default=None, metadata={"help": "module-name suffixes to train"})
    add_missing: bool = field(
        default=False, metadata={"help": "add zero biases to linear layers that have none (Llama, T5)"}
    )


def bias_width(module: nn.Module) -> int | None:
    """Size of the module's (possibly missing) bias, or None if it is not a biasable layer."""
    layer = unwrap(module)
    if isinstance(getattr(layer, "bias", None), torch.Tensor):
        return layer.bias.numel()
    if isinstance(layer, LINEAR_TYPES):
        return output_features(layer)
    return None


def bitfit_targets(model: nn.Module, config: BitFit, exclude: list[str]) -> dict[str, int]:
    """{module name: bias width} for the biases BitFit trains (inside the transformer blocks if any)."""
    candidates: dict[str, int] = {}
    components = [n for n, m in model.named_modules() if isinstance(m, DeltaComponent)]
    for name, module in model.named_modules():
        if "base_layer" in name.split(".") or any(name.startswith(c + ".") for c in components):
            continue  # look through wrappers, never into other methods' own layers
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        layer = unwrap(module)
        has_bias = isinstance(getattr(layer, "bias", None), nn.Parameter)  # not a buffer (GPT-BigCode's causal mask)
        if has_bias or (config.add_missing and isinstance(layer, LINEAR_TYPES)):
            width = bias_width(module)
            if width is not None and not any(name.startswith(c + ".") for c in candidates):
                candidates[name] = width
    returns_other = set(modules_not_returning_width(model, candidates))  # routers (their bias is the logits')
    candidates = {n: w for n, w in candidates.items() if n not in returns_other}
    if any(in_transformer_block(name) for name in candidates):  # the transformer layers' biases (Zaken et al. 2021 §3)
        candidates = {n: w for n, w in candidates.items() if in_transformer_block(n)}
    if config.subset is not None:
        candidates = {n: w for n, w in candidates.items() if any(n.endswith(s) for s in config.subset)}
        if not candidates:
            raise TargetError(f"BitFit subset {config.subset} matches no module with a bias")
    if not candidates:
        raise TargetError(
            "this model has no bias terms, so BitFit has nothing to train; use BitFit(add_missing=True) "
            "(command line: -o add_missing=true; compare: -o bitfit:add_missing=true) to add zero-initialised "
            "biases to its linear and norm layers"
        )
    return candidates


class BiasDelta(DeltaComponent):
    """Per-task bias shifts Δb added to one layer's output by a forward hook."""

    def __init__(self, layer: nn.Module, width: int, state: TaskState):
        super().__init__(state)
        self.width = width
        self.bias_delta = nn.ParameterDict()
        self.__dict__["layer"] = layer  # the hooked layer (not a submodule: it is our parent)
        self.__dict__["_hook"] = layer.register_forward_hook(self._add_bias_delta)
        self.__dict__["created_bias"] = False

    @property
    def tasks(self) -> list[str]:
        return list(self.bias_delta.keys())

    def add_task(self, task: str, config: BitFit) -> None:
        reference = float_reference(unwrap(self.layer))
        self.bias_delta[task] = nn.Parameter(
            torch.zeros(self.width, dtype=reference.dtype, device=reference.device)
        )

    def remove_task(self, task: str) -> None:
        if self.merged_task == task:
            self.unmerge()
        del self.bias_delta[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {"bias_delta": self.bias_delta[task]}

    def _add_bias_delta(self, layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:
            return self._add_bias_delta_mixed(output)
        task = self.active_task
        if task is None or task not in self.bias_delta or self.merged_task == task:
            return output
        return output + self.bias_delta[task]

    def _add_bias_delta_mixed(self, output: torch.Tensor) -> torch.Tensor:
        """A mixed-task batch: each example's own Δb (a zero row for tasks without BitFit here), gathered."""
        if self.merged_task is not None:
            raise RuntimeError(f"{self.merged_task!r} is merged into this bias: unmerge() before a mixed batch")
        if self.idle_in_mixed_pass():
            return output
        deltas = list(self.bias_delta.values())
        stack = self.stacked(  # (T+1, width)
            "bitfit", deltas, lambda: torch.cat([torch.stack(deltas), deltas[0].new_zeros(1, self.width)])
        )
        rows = self.example_rows(self.examples_in(output), output.device)
        # (B, width) -> (B, 1, ..., 1, width): one shift per example, broadcast over its positions
        return output + self.per_example(stack[rows], output)

    def merge(self, task: str) -> None:
        """b <- b + Δb (a linear layer without a bias gets one)."""
        if self.merged_task is not None:
            self.unmerge()
        layer = unwrap(self.layer)
        with torch.no_grad():
            if isinstance(getattr(layer, "bias", None), torch.Tensor):
                self.__dict__["unmerged_bias"] = layer.bias.detach().clone()  # exact unmerge
                layer.bias += self.bias_delta[task].to(layer.bias.dtype)
            else:
                layer.bias = nn.Parameter(self.bias_delta[task].detach().clone(), requires_grad=False)
                self.__dict__["created_bias"] = True
        self.merged_task = task

    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        layer = unwrap(self.layer)
        with torch.no_grad():
            if self.created_bias:
                layer.bias = None
                self.__dict__["created_bias"] = False
            else:
                layer.bias.copy_(self.__dict__.pop("unmerged_bias"))
        self.merged_task = None

    def unload(self) -> None:
        self._hook.remove()
        return None


def inject(model: nn.Module, config: BitFit, task: str, state: TaskState, exclude: list[str]) -> None:
    """Hook a BiasDelta (once) onto every BitFit target and give it a zero Δb for `task`."""
    for name, width in bitfit_targets(model, config, exclude).items():
        # hook the plain layer, not a wrapper around it: removing another method's task (which may
        # unwrap the layer) must not take the bias shifts with it
        layer = unwrap(model.get_submodule(name))
        component = getattr(layer, "bitfit", None)
        if component is None:
            component = BiasDelta(layer, width, state)
            layer.bitfit = component
        component.add_task(task, config)

