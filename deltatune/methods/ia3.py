"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022, "Few-Shot
Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning", §3.3).

Three learned vectors rescale activations elementwise in every transformer block: l_k the keys and l_v
the values of attention, l_ff the FFN's intermediate activation (eq. of §3.3):

    softmax(Q (l_k ⊙ K)^T / sqrt(d_k)) (l_v ⊙ V)            (l_ff ⊙ γ(W_1 x)) W_2

All three start at ones (§3.3), so training starts exactly from the base model; for MiniLM they are
6 x (384 + 384 + 1536) = 13,824 numbers, 0.06% of its 22.7M parameters.

deltatune rescales the *outputs* of the key and value projections (K = W_k x + b_k: l_k ⊙ K rescales the
bias too, as the equation does) and the *input* of the FFN's second linear layer W_2 (its input is
γ(W_1 x)): `targets` and `feedforward`, by default the architecture's (architectures.IA3_TARGETS), else
found from the model's structure like LoRA's W_q and W_v (the k and v rows of a fused projection; a
mixture of experts whose experts are 3-D parameters, not linear layers, gets l_k and l_v only). A hook on
each such layer multiplies by the active task's vector; on GPT-2's fused `c_attn` ([q | k | v]) only the
k and v slices carry a vector. In inference the rescaling is done in place: on the projections' outputs, and
on the input of the architecture's own FFN second layers (their input, the intermediate activation, is made
for them alone); the input of another layer named in `feedforward` is rescaled into a new tensor.

Both are weight changes, so `merge` is exact: a rescaled output is W's rows and b times l, a rescaled
input W's columns times l_ff. Mixed-task batches are the cheap case: each example gathers its task's
vector (a row of ones for examples of other tasks) and the activation is multiplied once — no matmul.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.core.architectures import (
    IA3_TARGETS,
    discover_ffn_outputs,
    discover_key_value,
    input_features,
    model_type,
    output_features,
    resolve_lora_targets,
    unwrap,
)
from deltatune.core.component import DeltaComponent, TaskState, float_reference
from deltatune.core.quantize import QuantizedLinear
from deltatune.errors import QuantizationError, TargetError


@dataclass
class IA3:
    """(IA)³ settings. None means the architecture's layers (IA3_TARGETS, else found from its structure); [] none."""

    targets: list[str] | str | None = field(default=None, metadata={
        "help": "layers whose outputs are rescaled (keys, values: l_k, l_v): suffixes, `c_attn[1/3]` slices, a regex"})
    feedforward: list[str] | str | None = field(default=None, metadata={
        "help": "layers whose inputs are rescaled (the FFN's second linear layer: l_ff): suffixes or a regex"})


class IA3Scales(DeltaComponent):
    """Per-task vectors rescaling one linear layer's output features (`ia3_l`) and/or input features
    (`ia3_ff`), applied by hooks on the layer. An output vector covers the layer's chosen output slices."""

    def __init__(self, layer: nn.Module, state: TaskState):
        super().__init__(state)
        self.ia3_l = nn.ParameterDict()  # output rescaling, over `out_slices[task]`
        self.ia3_ff = nn.ParameterDict()  # input rescaling, over all input features
        self.out_slices: dict[str, list[tuple[int, int]]] = {}
        # the input is the FFN's intermediate activation, made for this layer alone (targets.IA3_TARGETS): in
        # inference it is rescaled in place (measured on MiniLM: a new tensor made this 6x slower, 7% of a forward)
        self.owns_input = False
        self.transposed = not isinstance(layer, nn.Linear)  # Conv1D: weight is (d_in, d_out)
        self.in_features, self.out_features = input_features(layer), output_features(layer)
        self.__dict__["layer"] = layer  # the hooked layer (not a submodule: it is our parent)
        self.__dict__["_hooks"] = [layer.register_forward_pre_hook(self._scale_input),
                                   layer.register_forward_hook(self._scale_output)]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys([*self.ia3_l.keys(), *self.ia3_ff.keys()]))

    def add_task(self, task: str, config: IA3, where: str = "output", slices: list[tuple[int, int]] | None = None):
        """Ones for `task`: over the output `slices` (None: all outputs) when `where` is "output", over all
        inputs when it is "input"."""
        reference = float_reference(self.layer)  # a quantized base: the vectors in its compute dtype
        if where == "input":
            self.ia3_ff[task] = nn.Parameter(torch.ones(self.in_features, dtype=reference.dtype,
                                                        device=reference.device))
            return
        self.out_slices[task] = slices or [(0, self.out_features)]
        width = sum(end - start for start, end in self.out_slices[task])
        self.ia3_l[task] = nn.Parameter(torch.ones(width, dtype=reference.dtype, device=reference.device))

    def remove_task(self, task: str) -> None:
        if self.merged_task == task:
            self.unmerge()
        for vectors in (self.ia3_l, self.ia3_ff):
            if task in vectors:
                del vectors[task]
        self.out_slices.pop(task, None)

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        found = {"l": self.ia3_l.get(task), "l_ff": self.ia3_ff.get(task)}
        return {name: tensor for name, tensor in found.items() if tensor is not None}

    def output_scale(self, task: str) -> torch.Tensor:
        """(d_out,): the task's vector at its output slices, ones elsewhere (the vector itself for one
        slice covering the whole output)."""
        scale, slices = self.ia3_l[task], self.out_slices[task]
        if slices == [(0, self.out_features)]:
            return scale
        pieces, position, offset = [], 0, 0
        for start, end in slices:
            pieces += [scale.new_ones(start - position), scale[offset : offset + end - start]]
            position, offset = end, offset + end - start
        return torch.cat([*pieces, scale.new_ones(self.out_features - position)])

    # ---- forward: the hooks -------------------------------------------------------------------------
    def _scale_input(self, layer: nn.Module, args: tuple) -> tuple | None:
        if self.task_state.per_example is not None:
            scale = self._mixed_rows("ia3_ff", self.ia3_ff, lambda t: self.ia3_ff[t], self.in_features, args[0])
        else:
            task = self.active_task
            if task not in self.ia3_ff or self.merged_task == task:
                return None
            scale = self.ia3_ff[task].to(args[0].dtype)
        if scale is None:
            return None
        if self.owns_input and not (torch.is_grad_enabled() and (args[0].requires_grad or scale.requires_grad)):
            args[0].mul_(scale)
            return None
        # out of place: another layer's input may be read elsewhere too (a residual, another projection)
        return (args[0] * scale, *args[1:])

    def _scale_output(self, layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:
            scale = self._mixed_rows("ia3_l", self.ia3_l, self.output_scale, self.out_features, output)
        else:
            task = self.active_task
            if task not in self.ia3_l or self.merged_task == task:
                return output
            scale = self.output_scale(task).to(output.dtype)
        if scale is None:
            return output
        if torch.is_grad_enabled() and (output.requires_grad or scale.requires_grad):
            return output * scale
        return output.mul_(scale)  # inference: in place (the layer's output is read by nobody else yet)

    def _mixed_rows(self, key: str, vectors: nn.ParameterDict, placed, width: int, x: torch.Tensor):
        """(B, 1, .., width): each example's own vector (ones for examples whose task has none here), or None
        when no example of the batch has one."""
        if self.merged_task is not None:
            raise RuntimeError(f"{self.merged_task!r} is merged into this layer: unmerge() before a mixed batch")
        if not vectors or self.idle_in_mixed_pass():
            return None
        tasks = self.tasks
        reference = next(iter(vectors.values()))
        stack = self.stacked(key, list(vectors.values()), lambda: torch.stack(  # (T+1, width)
            [placed(t) if t in vectors else reference.new_ones(width) for t in tasks] + [reference.new_ones(width)]))
        rows = self.example_rows(self.examples_in(x), x.device)
        return self.per_example(stack[rows].to(x.dtype), x)

    # ---- merging ------------------------------------------------------------------------------------
    def merge(self, task: str) -> None:
        """W's rows and b times l (outputs), W's columns times l_ff (inputs); the pre-merge W and b are kept
        so that `unmerge` restores them bit for bit."""
        if isinstance(self.layer, QuantizedLinear):
            raise QuantizationError(
                f"cannot merge (IA)³ task {task!r} into a {self.layer.scheme}-quantized weight: rescaled rows or "
                f"columns of W are not representable in {self.layer.scheme} without rounding the scale away. Use the "
                f"task unmerged (one elementwise product per site), or load the base without --quantize and merge "
                f"there (the delta is portable).")
        if self.merged_task is not None:
            self.unmerge()
        layer = self.layer
        self.__dict__["unmerged"] = (layer.weight.detach().clone(),
                                     None if layer.bias is None else layer.bias.detach().clone())
        weight = layer.weight.T if self.transposed else layer.weight  # (d_out, d_in), a view
        with torch.no_grad():
            if task in self.ia3_l:
                scale = self.output_scale(task).to(weight.dtype)
                weight *= scale[:, None]
                if layer.bias is not None:
                    layer.bias *= scale
            if task in self.ia3_ff:
                weight *= self.ia3_ff[task].to(weight.dtype)[None, :]
        self.merged_task = task

    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        weight, bias = self.__dict__.pop("unmerged")
        with torch.no_grad():
            self.layer.weight.copy_(weight)
            if bias is not None:
                self.layer.bias.copy_(bias)
        self.merged_task = None

    def unload(self) -> None:
        self.__dict__.pop("unmerged", None)
        for hook in self._hooks:
            hook.remove()
        return None


def ia3_targets(model: nn.Module, config: IA3, exclude: list[str]):
    """({layer name: output slices or None}, [layer names]) whose outputs and inputs `config` rescales: those
    named, else the architecture's (IA3_TARGETS), else found from the model's structure (the key and value
    projections as LoRA finds W_q and W_v, `discover_key_value`; the FFN's second linear layers,
    `discover_ffn_outputs`)."""
    outputs_at, inputs_at = IA3_TARGETS.get(model_type(model), (None, None))
    chosen = []
    for given, default, discover in [(config.targets, outputs_at, discover_key_value),
                                     (config.feedforward, inputs_at, discover_ffn_outputs)]:
        targets = default if given is None else given
        if targets is None:
            found = discover(model)
            found = {n: None if rows is None else [rows] for n, rows in found.items()} if isinstance(found, dict) \
                else dict.fromkeys(found)
        else:
            found = resolve_lora_targets(model, targets, method="(IA)³") if targets else {}
        chosen.append({n: None if groups is None else sorted(r for group in groups for r in group)  # row ranges
                       for n, groups in found.items() if not any(n == e or n.startswith(e + ".") for e in exclude)})
    outputs, inputs = chosen
    sliced = [name for name, slices in inputs.items() if slices]
    if sliced:
        raise TargetError(f"(IA)³ feedforward targets rescale a layer's whole input; {sliced[0]} was given with an "
                          f"output slice [i/n]: name the layer without it")
    if not outputs and not inputs:
        raise TargetError("(IA)³ with targets=[] and feedforward=[] rescales nothing; name at least one layer")
    return outputs, list(inputs)


def ffn_output_layers(model: nn.Module) -> set[str]:
    """The architecture's FFN second linear layers (IA3_TARGETS): their input is theirs alone."""
    default = IA3_TARGETS.get(model_type(model))
    return set(resolve_lora_targets(model, default[1], method="(IA)³")) if default else set()


def inject(model: nn.Module, config: IA3, task: str, state: TaskState, exclude: list[str]) -> None:
    """Hook an IA3Scales (once) onto every target layer and give it ones for `task`."""
    outputs, inputs = ia3_targets(model, config, exclude)
    owned = ffn_output_layers(model) if inputs else set()
    for name, where, slices in [(n, "output", s) for n, s in outputs.items()] + [(n, "input", None) for n in inputs]:
        # hook the plain layer, not a wrapper around it (LoRA's): removing another method's task, which
        # may unwrap the layer, must not take these scales with it
        layer = unwrap(model.get_submodule(name))
        component = getattr(layer, "ia3", None)
        if component is None:
            component = IA3Scales(layer, state)
            component.owns_input = name in owned
            layer.ia3 = component
        component.add_task(task, config, where, slices)
