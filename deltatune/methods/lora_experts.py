"""LoRA on the experts of a mixture of experts: one low-rank update per expert on 3-D expert parameters.

In transformers 5 a sparse MoE block keeps all its experts' weights in 3-D parameters, not `nn.Linear`s:
Mixtral's and Qwen-MoE's `experts.gate_up_proj` (E, 2 d_ff, d) and `experts.down_proj` (E, d, d_ff), used as
`F.linear(x, W[e])`; GPT-OSS stores them transposed (E, d_in, d_out), used as `x @ W[e]` (its `is_transposed`).
Each expert e gets its own LoRA (Hu et al. 2021, eq. 3) on its own weight:

    W[e] <- W[e] + (alpha / r) B[e] A[e]        A: (E, r, d_in) Kaiming-uniform,  B: (E, d_out, r) zeros

so B A = 0 at the start and the model is the base model exactly (Hu et al. 2021 §4.1). This is what Hugging Face
peft does for `LoraConfig(target_parameters=[...])` (peft 0.21, `tuners/lora/layer.py`, `ParamWrapper`): it
parametrizes the 3-D parameter as W + scaling * (per-expert B A) for the duration of the experts' forward; its
lora_A is (r E, d_in) and lora_B (d_out, r E) with expert e's rank-r block at A's rows e r .. (e+1) r and at B's
columns e, E + e, 2E + e, ... (`ParamWrapper.get_delta_weight`: `B.reshape(d_out, r, E)`, `A.reshape(E, r, d_in)`);
`to_peft_factors` / `from_peft_factors` convert exactly.

`ExpertLoRA` wraps the experts module and calls it with W + ΔW in place of W (`torch.func.functional_call`: the
experts' own forward, whichever implementation transformers dispatches to, reads the adapted weights, and gradients
reach A and B). A mixed-task batch runs the experts once per group of tokens of one task (the experts see a
flattened (tokens, d) batch and compute each token on its own, so the groups are independent). `merge` adds ΔW into
W and keeps the pre-merge W, so `unmerge` restores it bit for bit. Like peft's, it has no dropout (the input of one
expert's update cannot be told apart from its base product once they share a weight).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call

from deltatune.core.architectures import wrapped_module
from deltatune.core.component import SWAPPING_PARAMETERS, DeltaComponent, TaskState, float_reference
from deltatune.errors import TargetError


class ExpertLoRA(DeltaComponent):
    """An experts module plus, per task, a per-expert (A, B) on each of its adapted 3-D parameters."""

    def __init__(self, base_layer: nn.Module, names: list[str], state: TaskState):
        super().__init__(state)
        self.base_layer = base_layer
        self.names = list(names)
        # GPT-OSS-style experts store W[e] as (d_in, d_out) (`x @ W[e]`), Mixtral-style as (d_out, d_in)
        self.transposed = bool(getattr(base_layer, "is_transposed", False))
        self.lora_A = nn.ParameterDict()  # "<task>__<param>" -> (E, r, d_in)
        self.lora_B = nn.ParameterDict()  # "<task>__<param>" -> (E, d_out, r)
        self.scaling: dict[str, float] = {}

    def shape(self, name: str) -> tuple[int, int, int]:
        """(experts, d_out, d_in) of parameter `name`."""
        experts, first, second = getattr(self.base_layer, name).shape
        return (experts, second, first) if self.transposed else (experts, first, second)

    @property
    def tasks(self) -> list[str]:
        return list(self.scaling)

    def add_task(self, task: str, config) -> None:
        reference = float_reference(self.base_layer)
        for name in self.names:
            experts, d_out, d_in = self.shape(name)
            A = torch.empty(experts, config.r, d_in, dtype=reference.dtype, device=reference.device)
            for expert in range(experts):  # as nn.Linear initialises a (r, d_in) weight, per expert (peft's A too)
                nn.init.kaiming_uniform_(A[expert], a=math.sqrt(5))
            self.lora_A[f"{task}__{name}"] = nn.Parameter(A)
            self.lora_B[f"{task}__{name}"] = nn.Parameter(A.new_zeros(experts, d_out, config.r))
        self.scaling[task] = config.scaling

    def remove_task(self, task: str) -> None:
        if self.merged_task == task:
            self.unmerge()
        for name in self.names:
            del self.lora_A[f"{task}__{name}"], self.lora_B[f"{task}__{name}"]
        del self.scaling[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        found = {}
        for name in self.names:
            found[f"{name}.lora_A"] = self.lora_A[f"{task}__{name}"]
            found[f"{name}.lora_B"] = self.lora_B[f"{task}__{name}"]
        return found

    def saved_layout(self) -> dict:
        """The adapted parameters in the module's own order: peft nests its wrappers in that order (formats/peft.py)."""
        return {"expert_parameters": list(self.names)}

    def delta_weight(self, task: str, name: str) -> torch.Tensor:
        """(alpha/r) B[e] A[e] for every expert, laid out as the parameter is: (E, d_out, d_in) or transposed."""
        A, B = self.lora_A[f"{task}__{name}"], self.lora_B[f"{task}__{name}"]
        delta = torch.bmm(B, A) * self.scaling[task]  # (E, d_out, r) @ (E, r, d_in) -> (E, d_out, d_in)
        return delta.transpose(1, 2) if self.transposed else delta

    def adapted(self, task: str) -> dict[str, torch.Tensor]:
        """{parameter name: W + ΔW} for `task`."""
        return {name: getattr(self.base_layer, name) + self.delta_weight(task, name).to(getattr(self.base_layer,
                                                                                              name).dtype)
                for name in self.names}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        with SWAPPING_PARAMETERS:  # functional_call swaps W + ΔW into the shared experts module for the call
            if self.task_state.per_example is not None:
                return self._forward_mixed(hidden_states, args, kwargs)
            return self._forward_single(hidden_states, *args, **kwargs)

    def _forward_single(self, hidden_states: torch.Tensor, *args, **kwargs):
        task = self.active_task
        if task is None or task not in self.scaling or self.merged_task == task:
            return self.base_layer(hidden_states, *args, **kwargs)
        return functional_call(self.base_layer, self.adapted(task), (hidden_states, *args), kwargs)

    def _forward_mixed(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        """Each token with its example's task: the experts run once per task present, on that task's tokens (the
        experts' inputs are (tokens, d) with each example's tokens consecutive, `example_rows`)."""
        if self.merged_task is not None:
            raise RuntimeError(f"{self.merged_task!r} is merged into these experts: unmerge() before a mixed batch")
        tokens = hidden_states.shape[0]
        rows = self.example_rows(tokens, hidden_states.device)  # (tokens,): the task of each token's example
        tasks = self.tasks
        output = None
        for row in rows.unique().tolist():
            index = (rows == row).nonzero().flatten()
            take = [value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim()
                    and value.shape[0] == tokens else value for value in (hidden_states, *args)]
            taken_kwargs = {key: value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim()
                            and value.shape[0] == tokens else value for key, value in kwargs.items()}
            if row < len(tasks):
                part = functional_call(self.base_layer, self.adapted(tasks[row]), tuple(take), taken_kwargs)
            else:  # examples whose task has no LoRA on these experts: the base experts
                part = self.base_layer(*take, **taken_kwargs)
            if output is None:
                output = part.new_zeros(tokens, *part.shape[1:])
            output = output.index_copy(0, index, part)
        return output

    def merge(self, task: str) -> None:
        """W <- W + ΔW for every adapted parameter; the pre-merge values are kept for an exact `unmerge`."""
        if self.merged_task == task:
            return
        if self.merged_task is not None:
            self.unmerge()
        self.__dict__["unmerged"] = {name: getattr(self.base_layer, name).detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                weight = getattr(self.base_layer, name)
                weight += self.delta_weight(task, name).to(weight.dtype)
        self.merged_task = task

    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        with torch.no_grad():
            for name, value in self.__dict__.pop("unmerged").items():
                getattr(self.base_layer, name).copy_(value)
        self.merged_task = None

    def unload(self) -> nn.Module:
        self.__dict__.pop("unmerged", None)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"parameters={self.names}, transposed={self.transposed}, tasks={self.tasks}"


def resolve_expert_parameters(model: nn.Module, suffixes: list[str]) -> dict[str, list[str]]:
    """{experts module name: [its 3-D parameter names]} for the parameters whose full names end with one of
    `suffixes` (`experts.gate_up_proj`, `down_proj`: as peft's `target_parameters`)."""
    chosen: dict[str, list[str]] = {}
    matched = set()
    for full, parameter in model.named_parameters():
        plain = full.replace(".base_layer", "")
        hit = next((s for s in suffixes if plain == s or plain.endswith("." + s)), None)
        if hit is None or "lora_" in plain:
            continue
        module, _, name = full.rpartition(".")
        if parameter.dim() != 3:
            raise TargetError(f"LoRA expert_parameters {hit!r} matches {plain}, of shape {tuple(parameter.shape)}: "
                              f"per-expert LoRA needs a 3-D (experts, d_out, d_in) parameter; adapt a linear layer "
                              f"with targets=[...] instead")
        module = module.removesuffix(".base_layer") if module.endswith(".base_layer") else module
        chosen.setdefault(module, []).append(name)
        matched.add(hit)
    missing = [s for s in suffixes if s not in matched]
    if missing:
        three_d = sorted({n.replace(".base_layer", "").split(".")[-1] for n, p in model.named_parameters()
                          if p.dim() == 3})
        raise TargetError(f"LoRA expert_parameters {missing} match no parameter of this {model_type_of(model)} model; "
                          f"its 3-D parameters are named {three_d or 'nothing (no experts stored as 3-D tensors)'}")
    return chosen


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def inject(model: nn.Module, config, task: str, state: TaskState, exclude: list[str]) -> None:
    """Wrap every experts module holding one of `config.expert_parameters` in an ExpertLoRA (once) and give it
    fresh per-expert A, B for `task`."""
    for module_name, names in resolve_expert_parameters(model, list(config.expert_parameters)).items():
        experts = wrapped_module(model, module_name, ExpertLoRA,
                                 lambda module, names=names: ExpertLoRA(module, names, state))
        if sorted(names) != sorted(experts.names):
            raise TargetError(f"{module_name} already carries expert LoRA on {experts.names}; a second task must "
                              f"adapt the same parameters (asked for {names})")
        experts.add_task(task, config)


def to_peft_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our (E, r, d_in), (E, d_out, r) -> peft's lora_A (r E, d_in) and lora_B (d_out, r E) (module docstring)."""
    experts, rank, _ = A.shape
    return A.reshape(experts * rank, -1), B.permute(1, 2, 0).reshape(B.shape[1], rank * experts)


def from_peft_factors(A: torch.Tensor, B: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's lora_A (r E, d_in), lora_B (d_out, r E) -> our (E, r, d_in), (E, d_out, r)."""
    rank = A.shape[0] // experts
    return A.reshape(experts, rank, -1), B.reshape(B.shape[0], rank, experts).permute(2, 0, 1)
