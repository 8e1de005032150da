"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

After each attention sub-layer and each feed-forward sub-layer, a small module with a skip connection
maps the sub-layer's output h (width d) through a bottleneck of width m << d (section 2.1, figure 2):

    adapter(h) = h + W_up f(W_down h + b_down) + b_up      W_down: m x d,  W_up: d x m,  f: GELU by default

It sits on the sub-layer's output *before* the residual add and the layer norm, so in the lecture's
notation h_2 = Dropout(W_m1 h_1 + b_m1) becomes adapter(h_2) and h_5 becomes adapter(h_5). Each adapter
has 2 m d + m + d parameters. W_up starts at zero, so adapter(h) = h exactly and training starts from the
base model (the paper's "near-identity initialization", section 2.1); W_down starts small and random.

Only the adapters, the layer norms and the head train (section 2.1). The layer norms are base weights
shared by all tasks, so each task keeps its own shifts Δg, Δb and the norm computes with g + Δg, b + Δb
(`NormDelta`, zero at init). `placement="pfeiffer"` keeps only the adapter after the feed-forward
sub-layer (Pfeiffer et al. 2021, "AdapterFusion"). Adapters add sequential computation, so they cannot
be merged into the base weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import MergeError, TargetError
from deltatune.methods.common import DeltaComponent, TaskState
from deltatune.targets import ADAPTER_SITES, model_type, unwrap

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "swish": F.silu}

PLACEMENTS = {"houlsby": (0, 1), "pfeiffer": (1,)}  # which of the two sites get an adapter


@dataclass
class Adapter:
    """Adapter settings (Houlsby et al. 2019)."""

    bottleneck: int = field(default=64, metadata={"help": "width m of the bottleneck (paper section 2.1)"})
    activation: str = field(default="gelu", metadata={"help": f"nonlinearity f: {sorted(ACTIVATIONS)}"})
    placement: str = field(
        default="houlsby", metadata={"help": "houlsby: after attention and FFN; pfeiffer: after the FFN only"}
    )
    train_norms: bool = field(default=True, metadata={"help": "also train each layer norm's g, b (section 2.1)"})
    method: ClassVar[str] = "adapter"

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ValueError(f"adapter bottleneck must be >= 1, got {self.bottleneck}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown adapter activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown adapter placement {self.placement!r}; choose one of {sorted(PLACEMENTS)}")


class BottleneckAdapter(DeltaComponent):
    """One adapter site: a forward hook on the sub-layer's output module adds W_up f(W_down h) per task."""

    method = "adapter"

    def __init__(self, layer: nn.Module, width: int, reference: torch.Tensor, state: TaskState):
        super().__init__(state)
        self.width = width
        self.__dict__["reference"] = reference  # a base weight: new adapters take its dtype and device
        self.adapter_down = nn.ModuleDict()  # task -> Linear(d, m)
        self.adapter_up = nn.ModuleDict()  # task -> Linear(m, d)
        self.activation: dict[str, str] = {}
        self.__dict__["layer"] = layer  # the hooked module (not a submodule: it belongs to the base model)
        self.__dict__["_hook"] = layer.register_forward_hook(self._add_adapter)

    @property
    def tasks(self) -> list[str]:
        return list(self.adapter_down.keys())

    def add_task(self, task: str, config: Adapter) -> None:
        options = dict(dtype=self.reference.dtype, device=self.reference.device)
        down = nn.Linear(self.width, config.bottleneck, **options)
        up = nn.Linear(config.bottleneck, self.width, **options)
        nn.init.normal_(down.weight, std=1e-2)  # small random, zero bias
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # W_up = 0, b_up = 0: adapter(h) = h at step 0
        nn.init.zeros_(up.bias)
        self.adapter_down[task], self.adapter_up[task] = down, up
        self.activation[task] = config.activation

    def remove_task(self, task: str) -> None:
        del self.adapter_down[task], self.adapter_up[task], self.activation[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        down, up = self.adapter_down[task], self.adapter_up[task]
        return {"adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def _add_adapter(self, layer: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:
            return self._add_adapter_mixed(output)
        task = self.active_task
        if task not in self.adapter_down:
            return output
        down, up = self.adapter_down[task], self.adapter_up[task]
        bottleneck = ACTIVATIONS[self.activation[task]](down(output.to(down.weight.dtype)))  # (..., m)
        return output + up(bottleneck).to(output.dtype)  # (..., m) -> (..., d), plus the skip connection

    def _add_adapter_mixed(self, output: torch.Tensor) -> torch.Tensor:
        """A mixed-task batch: each example through its own task's adapter, as two batched matmuls.

        Every task's W_down, W_up and biases are stacked once (cached), zero-padded to the widest bottleneck
        m_max, plus a zero row for examples whose task has no adapter here. Zero padding is exact: every
        activation has f(0) = 0, and the padded columns of W_up are zero."""
        params = [tensor for task in self.tasks for tensor in self.task_parameters(task).values()]
        down_w, down_b, up_w, up_b, uses = self.stacked("adapter", params, self._stack_for_mixed)
        batch = output.shape[0]
        rows = self.example_rows(batch, output.device)
        h = output.reshape(batch, -1, self.width).to(down_w.dtype)  # (B, L, d)
        # (B, L, d) @ (B, d, m_max) + (B, 1, m_max) -> (B, L, m_max)
        pre = torch.baddbmm(down_b[rows].unsqueeze(1), h, down_w[rows])
        if len(uses) == 1:
            bottleneck = ACTIVATIONS[next(iter(uses))](pre)
        else:  # tasks with different nonlinearities: each example takes its own
            bottleneck = torch.zeros_like(pre)
            for name, rows_using in uses.items():
                chosen = rows_using.to(pre.device)[rows].view(batch, 1, 1)
                bottleneck = torch.where(chosen, ACTIVATIONS[name](pre), bottleneck)
        # (B, L, m_max) @ (B, m_max, d) + (B, 1, d) -> (B, L, d), plus the skip connection
        update = torch.baddbmm(up_b[rows].unsqueeze(1), bottleneck, up_w[rows])
        return output + update.view(output.shape).to(output.dtype)

    def _stack_for_mixed(self):
        """W_down^T (T+1, d, m_max), b_down (T+1, m_max), W_up^T (T+1, m_max, d), b_up (T+1, d), and
        {activation: (T+1,) bool, which rows use it}."""
        tasks = self.tasks
        m_max = max(self.adapter_down[task].out_features for task in tasks)
        reference = self.adapter_down[tasks[0]].weight
        down_w = reference.new_zeros(len(tasks) + 1, self.width, m_max)
        down_b = reference.new_zeros(len(tasks) + 1, m_max)
        up_w = reference.new_zeros(len(tasks) + 1, m_max, self.width)
        up_b = reference.new_zeros(len(tasks) + 1, self.width)
        uses: dict[str, torch.Tensor] = {}
        for t, task in enumerate(tasks):
            down, up = self.adapter_down[task], self.adapter_up[task]
            m = down.out_features
            down_w[t, :, :m], down_b[t, :m] = down.weight.T, down.bias
            up_w[t, :m], up_b[t] = up.weight.T, up.bias
            uses.setdefault(self.activation[task], torch.zeros(len(tasks) + 1, dtype=torch.bool))[t] = True
        return down_w, down_b, up_w, up_b, uses

    def merge(self, task: str) -> None:
        raise MergeError("adapters add layers to the forward pass; they cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> None:
        self._hook.remove()
        return None

    def extra_repr(self) -> str:
        return f"width={self.width}, tasks={self.tasks}"


class NormDelta(DeltaComponent):
    """A layer norm (LayerNorm with or without bias, RMSNorm, T5LayerNorm) that computes with the active
    task's own gain and bias: its own forward runs with weight g + Δg and bias b + Δb (Δ zero at init, so
    the output is bit-identical to the base norm's)."""

    method = "adapter"
    role = "norm"  # counted apart from the adapters' own weights in reports and `deltatune params`

    def __init__(self, base_layer: nn.Module, state: TaskState):
        super().__init__(state)
        self.base_layer = base_layer
        self.norm_delta = nn.ModuleDict()  # task -> {"weight": Δg, "bias": Δb (if the norm has a bias)}

    @property
    def weight(self) -> torch.Tensor:  # HF code sometimes reads norm.weight directly
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def tasks(self) -> list[str]:
        return list(self.norm_delta.keys())

    def add_task(self, task: str, config: Adapter | None = None) -> None:
        self.norm_delta[task] = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros_like(p)) for name, p in self.base_layer.named_parameters(recurse=False)}
        )

    def remove_task(self, task: str) -> None:
        del self.norm_delta[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {f"{name}_delta": delta for name, delta in self.norm_delta[task].items()}

    def forward(self, *args, **kwargs):
        if self.task_state.per_example is not None:
            return self._forward_mixed(*args, **kwargs)
        task = self.active_task
        if task not in self.norm_delta:
            return self.base_layer(*args, **kwargs)
        shifted = {name: getattr(self.base_layer, name) + delta for name, delta in self.norm_delta[task].items()}
        # the norm's own forward with g + Δg, b + Δb: exact for any norm class, no copy of its code
        return torch.func.functional_call(self.base_layer, shifted, args, kwargs)

    def _forward_mixed(self, *args, **kwargs) -> torch.Tensor:
        """A mixed-task batch. A norm is affine in its gain and bias: y(g + Δg, b + Δb) = y(g, b) + Δg ⊙ x̂ + Δb,
        with x̂ the normalised input, so each example adds its own Δg ⊙ x̂ + Δb (zero rows: no delta here)."""
        base = self.base_layer(*args, **kwargs)
        params = [tensor for task in self.tasks for tensor in self.norm_delta[task].values()]
        stacks = self.stacked("norm", params, self._stack_for_mixed)  # {"weight": (T+1, d), "bias": (T+1, d)}
        batch = base.shape[0]
        rows = self.example_rows(batch, base.device)
        output = base
        for name, stack in stacks.items():
            delta = stack[rows].view(batch, *[1] * (base.dim() - stack.dim()), *stack.shape[1:])  # (B, 1.., d)
            if name == "bias":
                output = output + delta
            elif name == "weight":
                output = output + delta * self._normalised(base, args, kwargs)
            else:
                raise TypeError(f"{type(self.base_layer).__name__} has parameter {name!r}: not a gain or a bias")
        return output

    def _normalised(self, output: torch.Tensor, args, kwargs) -> torch.Tensor:
        """x̂: LayerNorm without affine; for other norm classes y(g + 1) - y(g), which is exact for any norm
        linear in its gain (RMSNorm, T5's, and Gemma's (1 + g) alike)."""
        layer = self.base_layer
        if isinstance(layer, nn.LayerNorm):
            return F.layer_norm(args[0] if args else kwargs["input"], layer.normalized_shape, eps=layer.eps)
        shifted = {"weight": layer.weight + 1}
        return torch.func.functional_call(layer, shifted, args, kwargs) - output

    def _stack_for_mixed(self) -> dict[str, torch.Tensor]:
        tasks = self.tasks
        return {
            name: torch.cat([torch.stack([self.norm_delta[task][name] for task in tasks]),
                             torch.zeros_like(base)[None]])
            for name, base in self.base_layer.named_parameters(recurse=False)
        }

    def merge(self, task: str) -> None:
        raise MergeError("adapters cannot be merged into the base weights, nor can their layer norms")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> nn.Module:
        return self.base_layer


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm layers with a learned gain (torch's and transformers' own classes)."""
    named = isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return named and isinstance(getattr(module, "weight", None), nn.Parameter)


def adapter_sites(model: nn.Module, config: Adapter, exclude: list[str]) -> list[str]:
    """Full names of the modules whose output gets an adapter, per the architecture's ADAPTER_SITES."""
    kind = model_type(model)
    if kind not in ADAPTER_SITES:
        raise TargetError(f"no adapter placement known for model type {kind!r}; known: {sorted(ADAPTER_SITES)}")
    patterns = [re.compile(ADAPTER_SITES[kind][i]) for i in PLACEMENTS[config.placement]]
    sites = [name for name in _own_modules(model, exclude) if any(p.search(name) for p in patterns)]
    if not sites:
        raise TargetError(f"adapter sites {[p.pattern for p in patterns]} match no module of this {kind} model")
    return sites


def _own_modules(model: nn.Module, exclude: list[str]) -> dict[str, nn.Module]:
    """{name: module} of the base model, not inside wrappers, other components or the heads."""
    modules = dict(model.named_modules())
    components = [n for n, m in modules.items() if isinstance(m, DeltaComponent)]
    return {
        name: module for name, module in modules.items()
        if "base_layer" not in name.split(".")
        and not any(name.startswith(c + ".") for c in components)
        and not any(name == e or name.startswith(e + ".") for e in exclude)
    }


def inject(model: nn.Module, config: Adapter, task: str, state: TaskState, exclude: list[str]) -> None:
    """Hook an adapter (once) after each chosen sub-layer, wrap each norm in a NormDelta (once), and give
    both fresh parameters for `task`."""
    width = model.config.hidden_size
    for name in adapter_sites(model, config, exclude):
        parent_name, _, _ = name.rpartition(".")
        parent = model.get_submodule(parent_name)  # the sub-layer: the adapter is stored beside its output
        component = getattr(parent, "adapter", None)
        if component is None:
            # hook the plain layer, so that a LoRA wrapper put around it later keeps the adapter in place
            layer = unwrap(model.get_submodule(name))
            component = BottleneckAdapter(layer, width, next(parent.parameters()), state)
            parent.adapter = component
        elif not isinstance(component, BottleneckAdapter):
            raise TargetError(f"{parent_name} already has an attribute 'adapter' ({type(component).__name__})")
        component.add_task(task, config)
    if not config.train_norms:
        return
    for name, module in _own_modules(model, exclude).items():
        if isinstance(module, NormDelta) or (is_norm(module) and not isinstance(module, DeltaComponent)):
            if not isinstance(module, NormDelta):
                parent_name, _, child = name.rpartition(".")
                module = NormDelta(module, state)
                setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
            module.add_task(task, config)
