"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").

A weight is split into a magnitude and a direction, and LoRA updates only the direction (§4.1, eq. 5):

    W' = m ⊙ (W + s B A) / ||W + s B A||_c        m: (d_out,), s = alpha / r as in LoRA

where ||.||_c is the norm of each output unit's weights (a row of W as (d_out, d_in); the paper's W is
d x k and normalises its columns). m starts at ||W||_c and B at zero (§4.1), so W' = W at step 0. A layer's
output for an input x with bias b is then

    y = b + g ⊙ (W x + s B A x),       g = m / ||W + s B A||_c

The norm is treated as a constant in backward (§4.3: "we suggest treating ||V + ΔV||_c in Eq. (5) as a
constant"), which saves the memory of its gradient; peft does the same, and so does this file.

deltatune builds DoRA from LoRA's pieces: a DoRA task is an ordinary LoRA task (A, B on the same
`LoRALinear`, so LoRA and DoRA tasks share a layer, a mixed batch and the merge code) plus a per-task
magnitude m in a `DoRAMagnitude` component hooked onto that layer's output. The hook turns the LoRA
output y_lora = W x + b + s B A x into

    y = y_lora + (g - 1) ⊙ (y_lora - b)

which is the expression above, and exactly y_lora where g = 1 (at initialisation, or in the rows of
other tasks in a mixed batch). In a mixed batch each example gathers its task's g (a row of ones for
the others): one elementwise product. On GPT-2's fused `c_attn` the magnitude covers the whole output,
as the paper decomposes the whole W (and as peft does); LoRA still adapts only the q and v slices.

`merge` folds it exactly: W <- g ⊙ (W + s B A), rows scaled (LoRA's merge adds s B A, then this scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.architectures import resolve_lora_targets, unwrap
from deltatune.core.component import DeltaComponent, TaskState
from deltatune.core.quantize import QuantizedLinear
from deltatune.errors import TargetError
from deltatune.methods import lora


@dataclass
class DoRA(lora.LoRA):
    """DoRA settings: LoRA's (rank, alpha, dropout, targets, rsLoRA), used for the direction's update."""


class DoRAMagnitude(DeltaComponent):
    """Per-task magnitudes m (d_out,) of one LoRALinear, applied to its output by a forward hook."""

    def __init__(self, lora_layer: lora.LoRALinear, state: TaskState):
        super().__init__(state)
        self.magnitude = nn.ParameterDict()
        self.__dict__["lora_layer"] = lora_layer  # not a submodule: it is our parent
        self.__dict__["_hook"] = lora_layer.register_forward_hook(self._rescale)

    @property
    def tasks(self) -> list[str]:
        return list(self.magnitude.keys())

    def add_task(self, task: str, config: DoRA) -> None:
        with torch.no_grad():  # m = ||W + s B A||_c = ||W||_c, since B = 0 (§4.1)
            self.magnitude[task] = nn.Parameter(self.weight_norm(task).clone())

    def remove_task(self, task: str) -> None:
        if self.merged_task == task:
            self.unmerge()
        del self.magnitude[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {"magnitude": self.magnitude[task]}

    def weight_norm(self, task: str) -> torch.Tensor:
        """||W + s B A||_c: (d_out,), the norm of each output unit's weights, not recorded for backward (§4.3)."""
        layer = self.lora_layer
        base = unwrap(layer.base_layer)
        with torch.no_grad():
            if isinstance(base, QuantizedLinear):  # the weight the layer multiplies by: dequant(W_q) (QDoRA)
                weight = base.dequantize()
            else:
                weight = base.weight.T if layer.transposed else base.weight  # (d_out, d_in)
            return torch.linalg.vector_norm(weight + layer.delta_weight(task).to(weight.dtype), dim=1)

    def scale(self, task: str) -> torch.Tensor:
        """g = m / ||W + s B A||_c, (d_out,)."""
        return self.magnitude[task] / self.weight_norm(task)

    def _rescale(self, layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:
            return self._rescale_mixed(output)
        task = self.active_task
        if task is None or task not in self.magnitude or self.merged_task == task:
            return output
        g = self.stacked(f"g:{task}", self._inputs(task), lambda: self.scale(task))
        return output + (g.to(output.dtype) - 1) * self._without_bias(output)

    def _rescale_mixed(self, output: torch.Tensor) -> torch.Tensor:
        """Each example's own g (ones for examples of other tasks), gathered: (B, d_out) -> (B, 1, .., d_out)."""
        if self.merged_task is not None:
            raise RuntimeError(f"{self.merged_task!r} is merged into this layer: unmerge() before a mixed batch")
        if self.idle_in_mixed_pass():
            return output
        tensors = [t for task in self.tasks for t in self._inputs(task)]
        ones = torch.ones_like(self.magnitude[self.tasks[0]])  # the row of examples without DoRA here
        stack = self.stacked("dora", tensors, lambda: torch.stack([self.scale(t) for t in self.tasks] + [ones]))
        rows = self.example_rows(self.examples_in(output), output.device)
        g = self.per_example(stack[rows].to(output.dtype), output)
        return output + (g - 1) * self._without_bias(output)

    def _inputs(self, task: str) -> list[torch.Tensor]:
        """What g depends on (the cache of `stacked` is rebuilt when one changes): m, A, B and W itself
        (full fine-tuning copies its weights into W)."""
        layer = self.lora_layer
        return [self.magnitude[task], layer.lora_A[task], layer.lora_B[task], unwrap(layer.base_layer).weight]

    def _without_bias(self, output: torch.Tensor) -> torch.Tensor:
        bias = unwrap(self.lora_layer.base_layer).bias
        return output if bias is None else output - bias.to(output.dtype)

    def merge(self, task: str) -> None:
        """W <- g ⊙ (W + s B A): the LoRA layer adds s B A (and keeps W for an exact unmerge), this scales
        the rows by g computed from that same W + s B A."""
        layer = self.lora_layer
        if layer.merged_task != task:
            layer.merge(task)
        weight = unwrap(layer.base_layer).weight
        with torch.no_grad():
            merged = weight.T if layer.transposed else weight  # (d_out, d_in), a view of W + s B A
            g = self.magnitude[task] / torch.linalg.vector_norm(merged, dim=1)
            merged *= g.to(weight.dtype)[:, None]
        self.merged_task = task

    def unmerge(self) -> None:
        """The LoRA layer restores the pre-merge W, which undoes the scaling as well."""
        if self.merged_task is None:
            return
        self.lora_layer.unmerge()
        self.merged_task = None

    def unload(self) -> None:
        self._hook.remove()
        return None


def inject(model: nn.Module, config: DoRA, task: str, state: TaskState, exclude: list[str]) -> None:
    """LoRA's A, B for `task` on every target layer, then a magnitude (once per layer, one per task)."""
    if config.expert_parameters:
        raise TargetError("DoRA on expert_parameters is not supported (nor by peft's target_parameters): use "
                          "LoRA(expert_parameters=[...]), or DoRA on linear layers with targets=[...]")
    lora.inject(model, config, task, state, exclude)
    for name in resolve_lora_targets(model, config.targets):
        layer = model.get_submodule(name)
        component = getattr(layer, "dora", None)
        if component is None:
            component = DoRAMagnitude(layer, state)
            layer.dora = component
        component.add_task(task, config)
