"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

After each attention sub-layer and each feed-forward sub-layer, a small module with a skip connection
maps the sub-layer's output h (width d) through a bottleneck of width m << d (section 2.1, figure 2):

    adapter(h) = h + W_up f(W_down h + b_down) + b_up      W_down: m x d,  W_up: d x m,  f: GELU by default

It sits on the sub-layer's output *before* the residual add and the layer norm (figure 2): the attention
output projection's result h becomes adapter(h), and so does the feed-forward output. Each adapter
has 2 m d + m + d parameters. W_up starts at zero, so adapter(h) = h exactly and training starts from the
base model (the paper's "near-identity initialization", section 2.1); W_down starts small and random.

Only the adapters, the layer norms and the head train (section 2.1). The layer norms are base weights
shared by all tasks, so each task keeps its own shifts Δg, Δb and the norm computes with g + Δg, b + Δb
(`NormDelta`, zero at init). `placement="pfeiffer"` keeps only the adapter after the feed-forward
sub-layer (Pfeiffer et al. 2021, "AdapterFusion"). Adapters add sequential computation, so they cannot
be merged into the base weights.

`placement="lin"` is Lin et al. 2020's adapter ("Exploring Versatile Generative Language Model via
Parameter-Efficient Transfer Learning", §2; the LoRA paper's "Adapter^L", Hu et al. 2021 §5.1): one per
block, on the block's output (after the feed-forward sub-layer and its residual add), with its own
LayerNorm inside (gain and bias per task, starting at 1 and 0):

    adapter(h) = h + W_up f(W_down LN(h) + b_down) + b_up         2 m d + m + d + 2 d parameters

Lin et al. freeze the whole base model (ReLU as f): `Adapter(placement="lin", train_norms=False,
activation="relu")`. `skip_layers=n` is AdapterDrop (Rücklé et al. 2021, "AdapterDrop: On the
Efficiency of Adapters in Transformers", §3): no adapters, and no trained norms, in the lowest n blocks
of each stack (nor in the embeddings), so those blocks compute exactly the base model's function for
every task: a mixed batch, or one input for several tasks, runs them once (`deltatune.core.shared_lower`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.architectures import (
    ADAPTER_SITES,
    block_index,
    block_lists,
    discover_adapter_sites,
    in_transformer_block,
    is_norm,
    model_type,
    unwrap,
    wrapped_module,
)
from deltatune.core.component import (
    SWAPPING_PARAMETERS,
    DeltaComponent,
    TaskState,
    float_reference,
    grouped_matmul,
    grouped_width,
)
from deltatune.errors import DeltaTuneError, MergeError, TargetError

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu, "tanh": torch.tanh, "silu": F.silu, "swish": F.silu}

PLACEMENTS = {"houlsby": (0, 1), "pfeiffer": (1,), "lin": ()}  # which of the two sites get an adapter
# ("lin": none of them; the block's own output instead)


@dataclass
class Adapter:
    """Adapter settings (Houlsby et al. 2019)."""

    bottleneck: int = field(default=64, metadata={"help": "width m of the bottleneck (paper section 2.1)"})
    activation: str = field(
        default="gelu", metadata={"help": f"nonlinearity f: {sorted(ACTIVATIONS)}", "choices": sorted(ACTIVATIONS)}
    )
    placement: str = field(default="houlsby", metadata={
        "help": "houlsby: after attention and FFN; pfeiffer: after the FFN only; lin: on each block's output, "
                "with its own LayerNorm (Lin et al. 2020)", "choices": list(PLACEMENTS)})
    train_norms: bool = field(default=True, metadata={"help": "also train each layer norm's g, b (section 2.1)"})
    skip_layers: int = field(default=0, metadata={
        "help": "AdapterDrop (Rücklé et al. 2021): no adapters or trained norms in the lowest n blocks"})

    def __post_init__(self) -> None:
        if isinstance(self.bottleneck, bool) or not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise DeltaTuneError(f"adapter bottleneck must be a whole number >= 1, got {self.bottleneck!r}")
        if self.activation not in ACTIVATIONS:
            raise DeltaTuneError(f"unknown adapter activation {self.activation!r}; choose one of "
                                 f"{sorted(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise DeltaTuneError(f"unknown adapter placement {self.placement!r}; choose one of {sorted(PLACEMENTS)}")
        if isinstance(self.skip_layers, bool) or not isinstance(self.skip_layers, int) or self.skip_layers < 0:
            raise DeltaTuneError(f"adapter skip_layers must be a whole number >= 0 (the lowest blocks left "
                                 f"without adapters), got {self.skip_layers!r}")


class BottleneckAdapter(DeltaComponent):
    """One adapter site: a forward hook on the sub-layer's output module adds W_up f(W_down h) per task."""

    def __init__(self, layer: nn.Module, width: int, reference: torch.Tensor, state: TaskState,
                 norm_eps: float | None = None):
        super().__init__(state)
        self.width = width
        self.norm_eps = norm_eps  # a number: Lin et al.'s adapter, LN(h) before W_down (one per block)
        self.__dict__["reference"] = reference  # a base weight: new adapters take its dtype and device
        self.adapter_down = nn.ModuleDict()  # task -> Linear(d, m)
        self.adapter_up = nn.ModuleDict()  # task -> Linear(m, d)
        self.adapter_norm = nn.ModuleDict()  # task -> LayerNorm(d) (lin placement only)
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
        if self.norm_eps is not None:  # gain 1, bias 0 (nn.LayerNorm's init)
            self.adapter_norm[task] = nn.LayerNorm(self.width, eps=self.norm_eps, **options)
        self.activation[task] = config.activation

    def remove_task(self, task: str) -> None:
        del self.adapter_down[task], self.adapter_up[task], self.activation[task]
        if task in self.adapter_norm:
            del self.adapter_norm[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        down, up = self.adapter_down[task], self.adapter_up[task]
        norm = {f"adapter_norm.{n}": p for n, p in self.adapter_norm[task].named_parameters()} \
            if task in self.adapter_norm else {}
        return {**norm, "adapter_down.weight": down.weight, "adapter_down.bias": down.bias,
                "adapter_up.weight": up.weight, "adapter_up.bias": up.bias}

    def _own_tensors(self) -> list[torch.Tensor]:
        """Every task's adapter tensors (the stamp of the mixed path's stacks), read straight from the layers: this
        runs at every adapter site of every mixed step, where building `task_parameters`' dicts cost ~10 ms a step."""
        layers = (*self.adapter_down._modules.values(), *self.adapter_up._modules.values(),
                  *self.adapter_norm._modules.values())
        return [tensor for layer in layers for tensor in layer._parameters.values()]

    def _add_adapter(self, layer: nn.Module, args, output):
        if isinstance(output, tuple):  # a block returning (hidden states, position bias, ...) (T5)
            return (self._add_adapter(layer, args, output[0]), *output[1:])
        if self.task_state.per_example is not None:
            return self._add_adapter_mixed(output)
        task = self.active_task
        if task not in self.adapter_down:
            return output
        down, up = self.adapter_down[task], self.adapter_up[task]
        h = output.to(down.weight.dtype)
        if task in self.adapter_norm:
            h = self.adapter_norm[task](h)
        bottleneck = ACTIVATIONS[self.activation[task]](down(h))  # (..., m)
        return output + up(bottleneck).to(output.dtype)  # (..., m) -> (..., d), plus the skip connection

    def _add_adapter_mixed(self, output: torch.Tensor) -> torch.Tensor:
        """A mixed-task batch: each example through its own task's adapter.

        Every task's W_down, W_up and biases are stacked once (cached), zero-padded to the widest bottleneck
        m_max, plus a zero row for examples whose task has no adapter here. Zero padding is exact: every
        activation has f(0) = 0, and the padded rows of W_up are zero (m_max is rounded up to `grouped_width`).
        Inference runs each task's adapter once on its own rows (`_add_adapter_grouped`); training gathers each
        example's weights (two batched matmuls)."""
        if self.idle_in_mixed_pass():
            return output
        stack = self.stacked("adapter", self._own_tensors(), self._stack_for_mixed)
        down_w, down_b, up_w, up_b, uses, norm_w, norm_b = stack
        batch = output.shape[0]
        rows = self.example_rows(batch, output.device)
        h = output.reshape(batch, -1, self.width).to(down_w.dtype)  # (B, L, d)
        if self.grouped_mixed(down_w.dtype, self.width, down_w.shape[2]):
            return self._add_adapter_grouped(output, h, rows, stack)
        if norm_w is not None:  # each example's own LN gain and bias: LN(h) = ĥ ⊙ g + b
            normalised = F.layer_norm(h, (self.width,), eps=self.norm_eps)
            h = normalised * norm_w[rows].unsqueeze(1) + norm_b[rows].unsqueeze(1)
        # (B, L, d) @ (B, d, m_max) + (B, 1, m_max) -> (B, L, m_max)
        pre = torch.baddbmm(down_b[rows].unsqueeze(1), h, down_w[rows])
        bottleneck = self._activate(pre, uses, rows)
        # (B, L, m_max) @ (B, m_max, d) + (B, 1, d) -> (B, L, d), plus the skip connection
        update = torch.baddbmm(up_b[rows].unsqueeze(1), bottleneck, up_w[rows])
        return output + update.view(output.shape).to(output.dtype)

    def _add_adapter_grouped(self, output: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, stack) -> torch.Tensor:
        """Inference on a mixed batch: the rows grouped by task once per forward pass (`task_groups`; decode steps
        padded to equal groups), each task's W_down and W_up multiply only its own rows (`grouped_matmul`), the
        updates are added back at the rows' places. One task's weight reads, and about one task's FLOPs, per row
        whatever the number of tasks (the dense path this replaced ran all T+1 tasks' adapters on every row and
        masked the others' updates)."""
        down_w, down_b, up_w, up_b, uses, norm_w, norm_b = stack
        groups, tasks = self.task_groups(rows, pad=h.shape[1] == 1), len(self.tasks)
        if not len(groups.targets):  # no example's task has an adapter here
            return output
        x, task_of = h.index_select(0, groups.order), groups.rows  # (N, L, d): the rows in the groups' slots
        if norm_w is not None:  # each example's own LN gain and bias: LN(h) = ĥ ⊙ g + b
            x = F.layer_norm(x, (self.width,), eps=self.norm_eps) * norm_w.index_select(0, task_of).unsqueeze(1) \
                + norm_b.index_select(0, task_of).unsqueeze(1)
        pre = grouped_matmul(x, down_w[:tasks], groups, down_b)  # (N, L, m_max)
        bottleneck = self._activate(pre, uses, task_of)
        update = grouped_matmul(bottleneck, up_w[:tasks], groups, up_b)  # (N, L, d)
        if groups.kept is not None:  # padding slots out
            update = update.index_select(0, groups.kept)
        added = output.reshape(h.shape).index_add(0, groups.targets, update.to(output.dtype))  # the skip connection
        return added.view(output.shape)

    @staticmethod
    def _activate(pre: torch.Tensor, uses: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """f(pre) for (B, L, m) pre-activations, each example (stack row `rows`) with its own task's nonlinearity."""
        if len(uses) == 1:
            return ACTIVATIONS[next(iter(uses))](pre)
        bottleneck = torch.zeros_like(pre)
        for name, rows_using in uses.items():  # tasks with different nonlinearities: each example takes its own
            chosen = rows_using.to(pre.device)[rows].view(-1, 1, 1)
            bottleneck = torch.where(chosen, ACTIVATIONS[name](pre), bottleneck)
        return bottleneck

    def _stack_for_mixed(self):
        """W_down^T (T+1, d, m_max), b_down (T+1, m_max), W_up^T (T+1, m_max, d), b_up (T+1, d),
        {activation: (T+1,) bool, which rows use it}, and the LN gains and biases (T+1, d) or None."""
        tasks = self.tasks
        reference = self.adapter_down[tasks[0]].weight
        m_max = grouped_width(max(self.adapter_down[task].out_features for task in tasks), reference.dtype)
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
        if self.norm_eps is None:
            return down_w, down_b, up_w, up_b, uses, None, None
        norm_w, norm_b = up_b.new_zeros(len(tasks) + 1, self.width), up_b.new_zeros(len(tasks) + 1, self.width)
        for t, task in enumerate(tasks):
            norm_w[t], norm_b[t] = self.adapter_norm[task].weight, self.adapter_norm[task].bias
        return down_w, down_b, up_w, up_b, uses, norm_w, norm_b

    def merge(self, task: str) -> None:
        raise MergeError("adapters add layers to the forward pass; they cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> None:
        self._hook.remove()
        return None

    def extra_repr(self) -> str:
        return f"width={self.width}, norm={self.norm_eps is not None}, tasks={self.tasks}"


class NormDelta(DeltaComponent):
    """A layer norm (LayerNorm with or without bias, RMSNorm, T5LayerNorm) that computes with the active
    task's own gain and bias: its own forward runs with weight g + Δg and bias b + Δb (Δ zero at init, so
    the output is bit-identical to the base norm's)."""

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
        with SWAPPING_PARAMETERS:  # functional_call swaps g + Δg into the shared norm for the call
            if self.task_state.per_example is not None:
                return self._forward_mixed(*args, **kwargs)
            return self._forward_single(*args, **kwargs)

    def _forward_single(self, *args, **kwargs):
        task = self.active_task
        if task not in self.norm_delta:
            return self.base_layer(*args, **kwargs)
        shifted = {name: getattr(self.base_layer, name) + delta for name, delta in self.norm_delta[task].items()}
        # the norm's own forward with g + Δg, b + Δb: exact for any norm class, no copy of its code
        return torch.func.functional_call(self.base_layer, shifted, args, kwargs)

    def _forward_mixed(self, *args, **kwargs) -> torch.Tensor:
        """A mixed-task batch. transformers' own norm classes with a gain only (RMSNorm, T5's, Gemma's) multiply
        the gain in elementwise: their forward runs once with each example's own gain g + Δg as a (B, 1.., d)
        weight, the arithmetic of each example alone (`_gain_per_row`). Otherwise (torch's LayerNorm, a bias):
        a norm is affine in its gain and bias, y(g + Δg, b + Δb) = y(g, b) + Δg ⊙ x̂ + Δb, with x̂ the
        normalised input, so each example adds its own Δg ⊙ x̂ + Δb (zero rows: no delta here)."""
        if self.idle_in_mixed_pass():
            return self.base_layer(*args, **kwargs)
        params = [tensor for deltas in self.norm_delta._modules.values() for tensor in deltas._parameters.values()]
        stacks = self.stacked("norm", params, self._stack_for_mixed)  # {"weight": (T+1, d), "bias": (T+1, d)}
        if self._gain_per_row():
            like = args[0] if args else next(iter(kwargs.values()))
            rows = self.example_rows(self.examples_in(like), like.device)
            weight = self.per_example(self.base_layer.weight + stacks["weight"][rows], like)  # (B, 1.., d): g + Δg
            return torch.func.functional_call(self.base_layer, {"weight": weight}, args, kwargs)
        base = self.base_layer(*args, **kwargs)
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

    def _gain_per_row(self) -> bool:
        """A gain-only norm of transformers' (`weight * hidden_states`), not torch's fused LayerNorm / RMSNorm,
        which take one weight of the normalised shape, and running its class's own forward (top_layers routes
        the final norm's forward per group of examples, each with its task's weights)."""
        layer = self.base_layer
        return (not isinstance(layer, nn.LayerNorm | nn.RMSNorm | nn.GroupNorm) and "forward" not in vars(layer)
                and list(layer._parameters) == ["weight"])

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


def adapter_sites(model: nn.Module, config: Adapter, exclude: list[str]) -> list[str]:
    """Full names of the modules whose output gets an adapter: per the architecture's ADAPTER_SITES, or
    every block (lin); none in the lowest `skip_layers` blocks of each stack."""
    kind = model_type(model)
    stacks = block_lists(model)
    depth = min((len(stack) for stack in stacks.values()), default=0)
    if config.skip_layers and config.skip_layers >= depth:
        raise DeltaTuneError(f"adapter skip_layers={config.skip_layers} leaves no adapter: the model's blocks "
                             f"number {depth}; choose skip_layers between 0 and {depth - 1}")
    if config.placement == "lin":
        sites = [f"{name}.{i}" for name, stack in stacks.items() for i in range(len(stack))]
    elif kind in ADAPTER_SITES:
        patterns = [re.compile(ADAPTER_SITES[kind][i]) for i in PLACEMENTS[config.placement]]
        sites = [name for name in _own_modules(model, exclude) if any(p.search(name) for p in patterns)]
    else:  # found from the blocks' structure (targets.discover_adapter_sites)
        found = discover_adapter_sites(model)
        if not all(found[i] for i in PLACEMENTS[config.placement]):
            missing = "no stack of transformer blocks" if not stacks else "no sub-layer output of width hidden_size"
            raise TargetError(f"no adapter placement known for model type {kind!r} (known: {sorted(ADAPTER_SITES)}) "
                              f"and none found in its structure ({missing}); use placement='lin' (an adapter on each "
                              f"block's output) where the blocks are found")
        own = _own_modules(model, exclude)
        sites = sorted((name for i in PLACEMENTS[config.placement] for name in found[i] if name in own),
                       key=list(own).index)
    sites = [name for name in sites if (block_index(name) or 0) >= config.skip_layers]
    if not sites:
        raise TargetError(f"no module of this {kind} model takes a {config.placement} adapter")
    return sites


def trained_norms(model: nn.Module, config: Adapter, exclude: list[str]) -> list[str]:
    """Names of the layer norms whose g, b train: all of them, or with skip_layers = n only those from the
    first adapted block on (a norm below it would make the lower blocks differ per task)."""
    modules = _own_modules(model, exclude)
    first_kept = next((i for i, name in enumerate(modules)
                       if in_transformer_block(name) and block_index(name) >= config.skip_layers), 0)
    return [name for i, (name, module) in enumerate(modules.items())
            if (isinstance(module, NormDelta) or (is_norm(module) and not isinstance(module, DeltaComponent)))
            and (not config.skip_layers or (block_index(name) >= config.skip_layers if in_transformer_block(name)
                                            else i >= first_kept))]


def _norm_eps(model: nn.Module) -> float:
    """The base model's own LayerNorm epsilon, for Lin et al.'s adapter LayerNorm."""
    config = model.config
    for name in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps"):
        if isinstance(getattr(config, name, None), float):
            return getattr(config, name)
    return 1e-5


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
        # the adapter is stored beside the output it changes: in the sub-layer, or (lin) in the block itself
        parent_name = name if config.placement == "lin" else name.rpartition(".")[0]
        parent = model.get_submodule(parent_name)
        component = getattr(parent, "adapter", None)
        if component is None:
            # hook the plain layer, so that a LoRA wrapper put around it later keeps the adapter in place
            layer = unwrap(model.get_submodule(name))
            eps = _norm_eps(model) if config.placement == "lin" else None
            component = BottleneckAdapter(layer, width, float_reference(parent), state, norm_eps=eps)
            parent.adapter = component
        elif not isinstance(component, BottleneckAdapter):
            raise TargetError(f"{parent_name} already has an attribute 'adapter' ({type(component).__name__})")
        component.add_task(task, config)
    if not config.train_norms:
        return
    for name in trained_norms(model, config, exclude):
        wrapped_module(model, name, NormDelta, lambda norm: NormDelta(norm, state)).add_task(task, config)
