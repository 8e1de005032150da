"""Top-k layer fine-tuning: only the last k transformer blocks, what follows them and the head train.

The "FT^Top2" baseline of Li & Liang 2021 ("Prefix-Tuning", §5.2: fine-tune the top 2 layers), also a
row of the LoRA paper's GPT-2 table (Hu et al. 2021, Table 3). The lower blocks keep their pretrained
weights; the top k blocks, the modules between them and the head (the final norm of pre-LN models —
GPT-2 `ln_f`, Llama `norm`, T5's decoder `final_layer_norm` — and BERT's pooler; `targets.FINAL_MODULES`)
and the task head train, all of their weights. The delta is those weights, whole, under the base
model's own names (`transformer.h.23.attn.c_attn.weight`, ...).

Each task keeps its own copy of those weights. The base modules keep their places and names (so other
methods' targets inside them stay where they are); their forward is routed through this component,
which puts the active task's weights in place of the base ones for the duration of the call — the
same tensors the task trains, so outputs are exact, and `use()` switches by reading the active task.

Mixed-task batches are where this method is cheap: the lower blocks hold no per-task weights, so all
rows go through them together, once; in each top block the rows are grouped by task and each group runs
the block with its own task's weights (rows of other methods' tasks and "base" rows: the base weights).
One mixed pass costs one pass of the lower blocks plus about one of the top k; running T tasks one at a
time costs T passes of everything (benchmarks/mixed_topk_adapterdrop.py).

`merge()` copies the task's weights into the base modules (a weight replacement, like full
fine-tuning) and keeps the replaced values, so `unmerge()` restores them bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from deltatune.core.architectures import final_modules, model_type, top_blocks, unwrap
from deltatune.core.component import DeltaComponent, TaskState, root_component, strip_wrappers
from deltatune.errors import DeltaTuneError
from deltatune.methods.full import component_parameter_ids

try:  # transformers >= 4.52 checkpoints a block's class forward (see `_run`)
    from transformers.modeling_layers import GradientCheckpointingLayer
except ImportError:  # pragma: no cover
    GradientCheckpointingLayer = ()


@dataclass
class TopLayers:
    """Top-k layer fine-tuning (Li & Liang 2021 §5.2, "FT-Top2")."""

    k: int = field(default=2, metadata={"help": "number of top transformer blocks that train (FT-Top2: 2)"})
    method: ClassVar[str] = "top_layers"

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise DeltaTuneError(f"top_layers k must be a whole number >= 1 (the number of top blocks that "
                                 f"train), got {self.k!r}; e.g. -o k=2")


def _key(name: str) -> str:
    """Parameter names as ParameterDict keys, which cannot contain '.'."""
    return name.replace(".", ":")


class TopLayerWeights(DeltaComponent):
    """One per model (at its root): every task's copies of its top blocks' and final modules' weights."""

    method = "top_layers"
    root_level = True  # its keys are the base model's own parameter names

    def __init__(self, model: nn.Module, state: TaskState):
        super().__init__(state)
        self.__dict__["model"] = model  # not a submodule: it is the model this component sits in
        self.weights = nn.ModuleDict()  # task -> ParameterDict {escaped full parameter name: weight}
        self.layout: dict[str, dict[str, list[str]]] = {}  # task -> {module name: [local parameter names]}
        self.__dict__["routed"] = {}  # module name -> the plain module whose forward comes here
        self.__dict__["slots"] = {}  # module name -> [(local name, owner module, leaf, base Parameter)]
        self.__dict__["premerge"] = {}  # full parameter name -> base value while a task is merged

    @property
    def tasks(self) -> list[str]:
        return list(self.weights.keys())

    def add_task(self, task: str, config: TopLayers) -> None:
        stack_name, stack = top_blocks(self.model)
        if config.k > len(stack):
            raise DeltaTuneError(f"top_layers k={config.k} is more than the model's {len(stack)} blocks "
                                 f"({stack_name}); choose k between 1 and {len(stack)}")
        names = [f"{stack_name}.{i}" for i in range(len(stack) - config.k, len(stack))]
        names += [name for name in final_modules(self.model) if name not in self.exclude]  # a pooler: a task head
        layout, weights = {}, nn.ParameterDict()
        for name in names:
            self._route(name)
            layout[name] = [local for local, *_ in self._slots(name)]
            for local, _, _, base in self._slots(name):
                weights[_key(f"{name}.{local}")] = nn.Parameter(base.detach().clone())
        self.weights[task], self.layout[task] = weights, layout

    def remove_task(self, task: str) -> None:
        del self.weights[task], self.layout[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {f"{name}.{local}": self.weights[task][_key(f"{name}.{local}")]
                for name, locals_ in self.layout[task].items() for local in locals_}

    # ---- routing a base module's forward through the task's weights ----------------------------------
    def _route(self, name: str) -> None:
        if name in self.routed:
            return
        module = unwrap(self.model.get_submodule(name))  # a NormDelta around ln_f keeps calling it
        # a bound method in a partial (not a closure), so that deepcopy of the model re-binds it to the copy
        module.forward = functools.partial(self._forward, name)
        self.routed[name] = module

    def _slots(self, name: str) -> list[tuple[str, nn.Module, str, nn.Parameter]]:
        """(local name, owner, leaf, base Parameter) of each base weight in module `name`, looking through
        other methods' wrappers (a LoRA wrapper keeps the same Linear as `base_layer`) and skipping their
        own parameters. Cached; rebuilt if a weight was re-registered."""
        cached = self.slots.get(name)
        if cached is not None and all(owner._parameters.get(leaf) is base for _, owner, leaf, base in cached):
            return cached
        module = self.routed[name]
        added = component_parameter_ids(self.model)
        slots = []
        for full, param in module.named_parameters():
            if id(param) in added:
                continue
            owner_name, _, leaf = full.rpartition(".")
            slots.append((strip_wrappers(full), module.get_submodule(owner_name), leaf, param))
        self.slots[name] = slots
        return slots

    def _run(self, name: str, task: str | None, args, kwargs, rows: list | None = None):
        """Module `name`'s own forward with `task`'s weights (and, for a group of a mixed batch, `rows` as the
        examples the components inside it see).

        Under gradient checkpointing transformers wraps the block class's forward in a checkpoint, and the
        backward pass recomputes that inner forward after this call has put the base weights back: the
        recomputation would save other tensors (torch's CheckpointError). So a checkpointing block is
        checkpointed here instead, around the weight swap, with the block's own checkpoint function."""
        module = self.routed[name]
        forward = type(module).forward
        inner = forward.__wrapped__ if isinstance(module, GradientCheckpointingLayer) else forward

        def run(*args, **kwargs):
            with self._weights_of(name, task), self._examples(rows):
                return inner(module, *args, **kwargs)

        if inner is not forward and module.gradient_checkpointing and module.training and torch.is_grad_enabled():
            return module._gradient_checkpointing_func(functools.partial(run, **kwargs), *args)
        return run(*args, **kwargs)

    @contextmanager
    def _examples(self, rows: list | None) -> Iterator[None]:
        """Within: the components see `rows` as the mixed batch's tasks (None: leave them as they are)."""
        if rows is None:
            yield
            return
        state = self.task_state
        outer, state.per_example = state.per_example, rows
        try:
            yield
        finally:
            state.per_example = outer

    @contextmanager
    def _weights_of(self, name: str, task: str | None) -> Iterator[None]:
        """Within: module `name` computes with `task`'s weights (None, or the merged task: the base's)."""
        if task is None or task == self.merged_task:
            yield
            return
        slots, own = self._slots(name), self.weights[task]
        try:
            for local, owner, leaf, _ in slots:
                owner._parameters[leaf] = own[_key(f"{name}.{local}")]
            yield
        finally:
            for _, owner, leaf, base in slots:
                owner._parameters[leaf] = base

    def check_mixed(self, tasks: set[str | None]) -> None:
        """Length-first hidden states (XLNet: (length, batch, d), masks with the batch in dim 2): the examples of
        a block's arguments are not all along one dim, so a top block cannot be run per group of examples."""
        if self.task_state.batch_dim != 0 and any(task in self.tasks for task in tasks):
            raise DeltaTuneError(f"top_layers tasks cannot share a mixed batch on a {model_type(self.model)} model: "
                                 f"its blocks keep hidden states length-first, so examples cannot be grouped by "
                                 f"task inside them; run each task alone with use(task) and no tasks=")

    def _owner(self, task: str | None, name: str) -> str | None:
        """The task whose weights module `name` uses for `task`'s examples (None: the base weights)."""
        return task if task in self.layout and name in self.layout[task] else None

    def _forward(self, name: str, *args, **kwargs):
        per_example = self.task_state.per_example
        if per_example is None:
            return self._run(name, self._owner(self.active_task, name), args, kwargs)
        groups: dict[str | None, list[int]] = {}  # whose weights -> the examples that use them
        for i, task in enumerate(per_example):
            groups.setdefault(self._owner(task, name), []).append(i)
        if len(groups) == 1:
            return self._run(name, next(iter(groups)), args, kwargs)
        return self._forward_groups(name, groups, args, kwargs)

    def _forward_groups(self, name: str, groups: dict, args, kwargs):
        """A mixed batch in a top module: each group of examples runs with its task's weights, and the
        outputs go back in batch order. Components inside the module see their group as the batch."""
        per_example = self.task_state.per_example
        batch = len(per_example)
        device = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)).device
        indices, outputs = [], []
        layer = next((m.layer_idx for m in self.routed[name].modules() if isinstance(getattr(m, "layer_idx", None),
                                                                                         int)), None)
        for task, rows in groups.items():
            index = torch.tensor(rows, device=device)
            outputs.append(self._run(name, task, [_take(a, index, batch, layer) for a in args],
                                     {k: _take(v, index, batch, layer) for k, v in kwargs.items()},
                                     rows=[per_example[i] for i in rows]))
            indices.append(index)
        order = torch.argsort(torch.cat(indices))  # row i of the batch is row order[i] of the concatenation
        return _gather(outputs, [len(index) for index in indices], order)

    # ---- merging -------------------------------------------------------------------------------------
    def merge(self, task: str) -> None:
        with torch.no_grad():
            for name in self.layout[task]:
                for local, _, _, base in self._slots(name):
                    self.premerge[f"{name}.{local}"] = (base, base.detach().clone())
                    base.copy_(self.weights[task][_key(f"{name}.{local}")])
        self.merged_task = task

    def unmerge(self) -> None:
        with torch.no_grad():
            for base, value in self.premerge.values():
                base.copy_(value)
        self.premerge.clear()
        self.merged_task = None

    def unload(self) -> None:
        for module in self.routed.values():
            del module.forward  # the class's forward again
        return None

    def extra_repr(self) -> str:
        return f"tasks={ {task: len(layout) for task, layout in self.layout.items()} }"


def _take(value: Any, index: torch.Tensor, batch: int, layer: int | None = None) -> Any:
    """The examples `index` of a batched argument; tuples element-wise; other arguments as they are.

    A key/value cache: what it holds for this block's `layer` before the block runs (prefix tuning's
    prefixes), for the examples `index`, in a new cache the block may extend; the shared cache is not
    written by the top blocks (a mixed pass scores, it does not generate)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == batch:
            return value.index_select(0, index)
        if value.dim() >= 3 and value.shape[0] % batch == 0:  # example-major (B * heads, ...): BLOOM's alibi
            per = value.shape[0] // batch
            rows = (index[:, None] * per + torch.arange(per, device=index.device)).flatten()
            return value.index_select(0, rows)
        return value
    if isinstance(value, tuple | list):
        return type(value)(_take(v, index, batch, layer) for v in value)
    if type(value).__name__ == "EncoderDecoderCache":
        return type(value)(_take(value.self_attention_cache, index, batch, layer),
                           _take(value.cross_attention_cache, index, batch, layer))
    if type(value).__name__.endswith("Cache"):
        from transformers import DynamicCache

        try:  # the model's own cache class: MiniMax's lightning-attention layers read its linear cache
            rows = type(value)()
        except TypeError:  # one that needs a config: a plain cache of keys and values
            rows = DynamicCache()
        held = value.layers[layer] if layer is not None and layer < len(getattr(value, "layers", [])) else None
        if held is not None and getattr(held, "keys", None) is not None and held.keys.numel():
            rows.update(held.keys.index_select(0, index), held.values.index_select(0, index), layer)
        return rows
    return value


def _gather(outputs: list[Any], sizes: list[int], order: torch.Tensor) -> Any:
    """Groups' outputs back into one batch: tensors with the group's examples in dim 0 are concatenated and
    reordered. A tensor broadcast over its group (dim 0 of 1: T5's position bias, computed from each
    task's own relative-attention weights) is expanded to the group first, unless all groups agree on it;
    anything else (None) is taken from the first group."""
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        if any(out.dim() == 0 or out.shape[0] not in (size, 1) for out, size in zip(outputs, sizes, strict=True)):
            return first
        if all(out.shape[0] == 1 for out in outputs) and all(torch.equal(out, first) for out in outputs[1:]):
            return first
        expanded = [out.expand(size, *out.shape[1:]) for out, size in zip(outputs, sizes, strict=True)]
        return torch.cat(expanded).index_select(0, order.to(first.device))
    if isinstance(first, tuple | list):
        return type(first)(_gather(list(parts), sizes, order) for parts in zip(*outputs, strict=True))
    return first


def inject(model: nn.Module, config: TopLayers, task: str, state: TaskState, exclude: list[str]) -> None:
    """One TopLayerWeights at the model's root (once) keeps every task's top-block weights."""
    component = root_component(model, "deltatune_top_layers", lambda: TopLayerWeights(model, state))
    component.__dict__["exclude"] = list(exclude)  # the task heads: trained as heads, not as top-layer weights
    component.add_task(task, config)
