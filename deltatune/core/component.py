"""What every method's injected modules share: the active-task switch and per-task parameters.

A `DeltaComponent` is a small module that a method puts into the base model (a LoRA wrapper around a
linear layer, a bias delta hooked onto a layer, an adapter, a prompt, a task head). It keeps one set
of parameters *per task* — `ParameterDict`s keyed by the task name — so that several task deltas live
on one base model, and reads which task is active from a `TaskState` shared by all components of one
`DeltaModel`. Switching tasks is therefore one assignment, and exact.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.errors import TaskError

TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
BASE_TASK = "base"  # the name of "no delta": the plain base model
Component = TypeVar("Component", bound=nn.Module)
DENSE_MIXED_LIMIT = 32  # tokens per example x stacked tasks up to which a mixed pass computes every task densely
GROUPED_MIXED = True  # mixed inference passes of the methods that support it run each task once on its own rows
# Held through the forward of a component that swaps tensors into its base module (`torch.func.functional_call`:
# a norm's gain g + Δg, experts' W + ΔW): no forward pass on another thread (serve's --decode-loops) may run that
# module while another row's tensors are swapped in.
SWAPPING_PARAMETERS = threading.RLock()


def check_task_name(task: str) -> str:
    """Task names become parameter-dict keys and folder names: letters, digits, `_` and `-` only."""
    if not isinstance(task, str) or not TASK_NAME.match(task) or task == BASE_TASK:
        raise TaskError(
            f"invalid task name {task!r}: use 1-64 letters, digits, '_' or '-' (not starting with '-'); "
            f"{BASE_TASK!r} is reserved for the plain base model"
        )
    if any(hasattr(container, task) for container in (nn.ParameterDict(), nn.ModuleDict())):
        # per-task parameters live in Parameter/ModuleDicts, whose method names cannot be keys
        raise TaskError(f"task name {task!r} is reserved (a torch container method); choose another name")
    return task


class _Route:
    """Which task(s) one forward pass runs: `active` (one task; None: the base model) or, during a mixed pass,
    `per_example` (one task per example) and what the components derive from it once per pass (`rows`)."""

    def __init__(self) -> None:
        self.active: str | None = None
        self.per_example: list[str | None] | None = None
        self.rows: dict[tuple, Any] = {}


class TaskState:
    """Which task the model runs now; shared by reference between a DeltaModel and its components.

    `active` is one task name (or None for the base model). `per_example` is set only during a
    mixed-task forward pass: a list with one task name per example of the batch (None: the base model).

    One route serves every thread, except a thread inside `own_route()`: it routes its passes apart from the others
    (`deltatune serve`'s decode loops run one model from several threads, each batch under its own tasks).
    """

    def __init__(self) -> None:
        self.batch_dim = 0  # where the examples are in the blocks' hidden states: 1 for length-first models (XLNet)
        self._shared = _Route()
        self._local = threading.local()

    @property
    def _route(self) -> _Route:
        return getattr(self._local, "route", None) or self._shared

    @contextlib.contextmanager
    def own_route(self):
        """This thread's forward passes routed apart from other threads' while inside (starting at the base model)."""
        self._local.route = _Route()
        try:
            yield
        finally:
            del self._local.route

    @property
    def active(self) -> str | None:
        return self._route.active

    @active.setter
    def active(self, task: str | None) -> None:
        self._route.active = task

    @property
    def per_example(self) -> list[str | None] | None:
        return self._route.per_example

    @per_example.setter
    def per_example(self, tasks: list[str | None] | None) -> None:
        route = self._route
        route.per_example = None if tasks is None else list(tasks)
        route.rows = {}

    @property
    def _rows(self) -> dict[tuple, Any]:  # per forward pass: example rows (and masks, groups) per task list
        return self._route.rows

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles take the shared route (a thread's is its own)
        return {"batch_dim": self.batch_dim, "_shared": self._shared}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _local=threading.local())

    def uses_any(self, tasks: list[str]) -> bool:
        """Whether some example of the mixed pass runs one of `tasks` (a component none of whose tasks is in the
        batch takes its base path, at no cost: e.g. DoRA's layers in a step of LoRA rows). Once per pass and list."""
        route = self._route
        key = ("uses", tuple(tasks))
        used = route.rows.get(key)
        if used is None:
            used = route.rows[key] = not set(route.per_example or ()).isdisjoint(tasks)
        return used

    def example_rows(self, tasks: list[str], device: torch.device) -> torch.Tensor:
        """(B,) long: for each example of the mixed batch, the index of its task in `tasks`, or len(tasks)
        (the zero row of a component's stacked weights) when `tasks` lacks it. Computed once per
        forward pass for each distinct task list: the components of one method share theirs."""
        key = (tuple(tasks), torch.device(device))
        route = self._route
        rows = route.rows.get(key)
        if rows is None:
            position = {task: i for i, task in enumerate(tasks)}
            rows = torch.tensor([position.get(t, len(tasks)) for t in route.per_example or []], device=device)
            route.rows[key] = rows
        return rows


@dataclass(frozen=True)
class TaskGroups:
    """A mixed batch's rows grouped by task, so that each task's weights run once on its own rows: the segmented
    layout of Punica's SGMV kernel (Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving", §4) and of grouped GEMMs.

    `order`: the batch row in each slot of the layout; `rows`: each slot's task (its index in the stack); `targets`
    (B'): the batch rows of the real slots (`kept`, in that order; None: every slot is real), those whose task has
    weights here, sorted by task (stable: by row within a task). Two layouts, chosen once per forward pass (`of`):
    - runs (`padded` None): the B' rows sorted by task, `offsets` (T,) int32 where each task's run ends (an absent
      task repeats the previous end: an empty group, skipped at no cost), for torch's grouped GEMM;
    - padded (decode steps whose groups are about equal): task t's rows in slots t*R .. t*R + R - 1 (`padded` = R,
      the largest group), padding slots repeating a row, for one batched matmul (T, R, k) @ (T, k, n). On CPU it
      measured 0.87x of one task's decode step where the grouped GEMM's loop of small GEMMs gave 0.80x."""

    order: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor
    targets: torch.Tensor
    padded: int | None = None
    kept: torch.Tensor | None = None

    @classmethod
    def of(cls, rows: torch.Tensor, tasks: int, pad: bool = False) -> TaskGroups:
        """From (B,) stack rows (`example_rows`); rows equal to `tasks` (the zero row: no weights here) left out.
        `pad`: the padded layout where it costs at most twice the rows (T * R <= 2 B'), else the runs."""
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=tasks + 1)[:tasks]  # (T,); the zero row's examples sort last
        order = order[: int(counts.sum())]
        by_task, offsets = rows[order], counts.cumsum(0).to(torch.int32)
        widest = int(counts.max()) if len(order) else 0
        if not pad or not len(order) or tasks * widest > 2 * len(order):
            return cls(order, by_task, offsets, targets=order)
        place = torch.arange(len(order), device=rows.device) - (offsets - counts)[by_task]  # within its task's run
        slots = by_task * widest + place  # (B',) each row's slot in the padded layout
        padded = order[:1].repeat(tasks * widest).index_copy_(0, slots, order)
        kept = None if len(order) == tasks * widest else slots
        task_of = torch.arange(tasks, device=rows.device).repeat_interleave(widest)
        return cls(padded, task_of, offsets, targets=order, padded=widest, kept=kept)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, groups: TaskGroups, bias: torch.Tensor) -> torch.Tensor:
    """(N, L, k) rows in the layout of `groups` @ (T, k, n) per-task weights + (T, n) per-task biases -> (N, L, n):
    each task's weight multiplies only its own rows (and, padded, its padding slots), read once and not copied.
    Padded: one batched matmul, each task's bias broadcast over its slots. Runs: torch's grouped GEMM
    (`F.grouped_mm`, made for mixture-of-experts layers; on CPU a loop of GEMMs in C++), each row's bias gathered.
    grouped_mm has no backward on CPU in torch 2.13, so this is for inference only (`DeltaComponent.grouped_mixed`),
    and its row strides must be multiples of 16 bytes (`grouped_width`)."""
    tasks, n = weights.shape[0], weights.shape[-1]
    if groups.padded is not None:  # (T, 1, n) + (T, R L, k) @ (T, k, n) -> (T, R L, n)
        return torch.baddbmm(bias[:tasks].unsqueeze(1), x.view(tasks, -1, x.shape[-1]), weights).view(*x.shape[:-1], n)
    offsets = groups.offsets if x.shape[1] == 1 else groups.offsets * x.shape[1]  # an example's L tokens in a run
    flat = F.grouped_mm(x.reshape(-1, x.shape[-1]), weights, offs=offsets)  # (B' L, k) @ (T, k, n) -> (B' L, n)
    return flat.view(*x.shape[:-1], n).add_(bias.index_select(0, groups.rows).unsqueeze(1))


def grouped_width(width: int, dtype: torch.dtype) -> int:
    """`width` rounded up to what `grouped_matmul` accepts as a row's length: a multiple of 16 bytes."""
    per_row = 16 // dtype.itemsize
    return -(-width // per_row) * per_row


def float_reference(module: nn.Module) -> torch.Tensor:
    """A floating-point tensor of `module` (parameter, else buffer) whose dtype and device new delta parameters
    take. A quantized base weight packed into bytes (bitsandbytes' NF4) is skipped: deltas stay in full precision
    beside it (Dettmers et al. 2023 §3)."""
    for sub in module.modules():
        sample = getattr(sub, "weight_sample", None)  # a QuantizedLinear: its full-precision weight's first values
        if isinstance(sample, torch.Tensor):
            return sample
        for tensor in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            if tensor.is_floating_point():
                return tensor
    raise TypeError(f"{type(module).__name__} has no floating-point parameter or buffer to take a dtype from")


def strip_wrappers(name: str) -> str:
    """Parameter/module names as in the plain base model: wrappers insert `.base_layer`."""
    return name.replace(".base_layer", "").replace("base_layer.", "")


class DeltaComponent(nn.Module):
    """Base of every module a method injects. Subclasses keep per-task parameters.

    Contract (what `DeltaModel` relies on):
    - `task_parameters(task)` -> {local name: Parameter} for the delta file (without the task name);
    - `add_task(task, config)` creates fresh parameters for a task; `remove_task(task)` drops them;
    - `merge(task)` / `unmerge()` fold a task into the base weights and back (or raise MergeError);
    - `unload()` -> the module that replaces this component when the model is returned plain.

    Mixed-task batches: while `task_state.per_example` is set, a component's forward runs each example
    with its own task (its single-task path stays as it is; one dispatch line at its top). Per-task weights
    are stacked along a new dim 0 with a zero row last (`stacked`, cached) and each example gathers its
    row (`example_rows`); `check_mixed` refuses tasks that cannot share a pass (full fine-tuning).
    """

    root_level: ClassVar[bool] = False  # True: keys are not prefixed with the component's module name
    # how its parameters are counted in reports: the method's own ("method"), base-model normalisation
    # layers a method also trains ("norm", e.g. adapters' LayerNorms), or the task head ("head")
    role: ClassVar[str] = "method"
    # order in which components rewrite a forward call's inputs (`prepare_inputs`): components that change
    # the input sequence (prompt tuning, 0) before those that extend its attention mask (prefix tuning, 1)
    input_order: ClassVar[int] = 0

    def __init__(self, state: TaskState) -> None:
        super().__init__()
        # a plain attribute (not a submodule): one TaskState shared by all components
        self.__dict__["task_state"] = state
        self.merged_task: str | None = None

    @property
    def active_task(self) -> str | None:
        return self.task_state.active

    @property
    def tasks(self) -> list[str]:
        raise NotImplementedError

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def trained_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """What the optimizer updates for `task`: the delta's own parameters, unless a method trains them
        through a reparameterization whose output is what it saves (prefix tuning's MLP)."""
        return self.task_parameters(task)

    def saved_parameters(self, task: str) -> dict[str, torch.Tensor]:
        """What `save_delta` writes for `task`: its parameters, unless a method saves them in another form (a
        PiSSA LoRA task: the rank-2r LoRA it equals on the unmodified base, with the config's `saved_config`)."""
        return self.task_parameters(task)

    def on_load(self, task: str) -> None:
        """Called after a saved delta was read into `task_parameters(task)`."""

    def add_task(self, task: str, config) -> None:
        raise NotImplementedError

    def remove_task(self, task: str) -> None:
        raise NotImplementedError

    def merge(self, task: str) -> None:
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def unload(self) -> nn.Module | None:
        """The plain module to put back where this component sits (None: just remove it)."""
        raise NotImplementedError

    def on_switch(self) -> None:
        """Called after the active task changed (most components just read `active_task`)."""

    def prepare_inputs(self, inputs: dict) -> dict:
        """Methods that act on the input sequence (prompt tuning) rewrite the forward kwargs here."""
        return inputs

    # ---- mixed-task batches (task_state.per_example is set) -----------------------------------------
    def check_mixed(self, tasks: set[str | None]) -> None:
        """Raise if these tasks cannot share one forward pass here (called before every mixed pass)."""

    def saved_layout(self) -> dict | None:
        """What a saved delta records about this component's shape beyond its tensors (None: nothing)."""
        return None

    def idle_in_mixed_pass(self) -> bool:
        """Whether no example of this mixed inference pass has a task with parameters here (its mixed path would
        add zeros). Never while gradients are recorded: every task's parameters then get their (zero) gradient."""
        return not torch.is_grad_enabled() and not self.task_state.uses_any(self.tasks)

    def example_rows(self, batch: int, device: torch.device) -> torch.Tensor:
        """Each example's row in this component's stacked weights (`stacked`): its task's index in
        `self.tasks`, or len(self.tasks) for examples whose task has no parameters here."""
        examples = len(self.task_state.per_example)
        rows = self.task_state.example_rows(self.tasks, device)
        if batch == examples:
            return rows
        if batch % examples == 0:  # (B, L, d) flattened to (B * L, d) before this layer (OPT's feed-forward):
            return rows.repeat_interleave(batch // examples)  # each example's L tokens are consecutive rows
        raise ValueError(f"{type(self).__name__} got a batch of {batch} examples, but tasks= names "
                         f"{examples}; the model must keep the batch in dim 0")

    def per_example(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B, width) values, one row per example, viewed to broadcast over `like`: (B, 1, .., width), or
        (1, B, 1, .., width) where the examples are along dim 1 (`TaskState.batch_dim`, XLNet)."""
        shape = [1] * like.dim()
        shape[self.task_state.batch_dim], shape[-1] = values.shape[0], values.shape[-1]
        return values.view(shape)

    def examples_in(self, like: torch.Tensor) -> int:
        """How many rows of a mixed batch `like` holds: its size along the examples' dim."""
        return like.shape[self.task_state.batch_dim]

    @staticmethod
    def dense_mixed(tokens: int, stacked_tasks: int) -> bool:
        """Whether a mixed inference pass runs every stacked task's update on every row, the other tasks' part
        zeroed by `task_mask` (two plain matmuls over all tasks' weights side by side), instead of gathering
        each row's own weights (B copies of them). Decode steps (one token per row) with a few tasks: the
        gather copied ~1 MB per layer per step; the dense products cost (tasks x tokens) times a row's update,
        measured faster up to DENSE_MIXED_LIMIT (benchmarks/decode_step.py)."""
        return not torch.is_grad_enabled() and tokens * stacked_tasks <= DENSE_MIXED_LIMIT

    @staticmethod
    def grouped_mixed(dtype: torch.dtype, *widths: int) -> bool:
        """Whether a mixed inference pass runs each task's weights once on its own rows, sorted by task
        (`task_groups`, `grouped_matmul`): no copy of the weights per row (the gather's B copies), no other tasks'
        work masked away (the dense path's T+1 times one task's). Training keeps the gather (no grouped backward),
        and so do rows of `widths` that are not whole multiples of 16 bytes (`grouped_width`)."""
        return GROUPED_MIXED and not torch.is_grad_enabled() and all(grouped_width(w, dtype) == w for w in widths)

    def task_groups(self, rows: torch.Tensor, pad: bool = False) -> TaskGroups:
        """This batch's rows grouped by this component's tasks (`TaskGroups`; `pad`: the padded layout where it
        fits, for decode steps), built once per forward pass for the components that share `self.tasks` (every
        adapter layer of a model: 60 per SmolLM2 step)."""
        key = ("groups", tuple(self.tasks), len(rows), rows.device, pad)
        groups = self.task_state._rows.get(key)
        if groups is None:
            groups = TaskGroups.of(rows, len(self.tasks), pad)
            self.task_state._rows[key] = groups
        return groups

    def task_mask(self, rows: torch.Tensor, stacked_tasks: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, T+1, 1): 1 at each example's own task, 0 elsewhere (for the dense mixed path); built once per
        forward pass for the components that share `self.tasks`."""
        key = ("mask", tuple(self.tasks), len(rows), dtype, rows.device)
        mask = self.task_state._rows.get(key)
        if mask is None:
            mask = nn.functional.one_hot(rows, stacked_tasks).to(dtype).view(len(rows), 1, stacked_tasks, 1)
            self.task_state._rows[key] = mask
        return mask

    def stacked(self, key: str, tensors: list[torch.Tensor], build: Callable[[], Any]) -> Any:
        """`build()`: per-task weights stacked along a new dim 0 (one row per task, plus a zero row), cached.

        The cache is rebuilt when the task list changed or any of `tensors` was updated in place (an
        optimizer step or a load bumps `_version`). It holds the tensors themselves, so that their ids cannot
        be reused by new parameters while cached. While gradients are recorded for the parameters, the
        stack is built anew each pass: gradients flow through it into each task's own parameters."""
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return build()
        stamp = (tuple(self.tasks), tuple((id(t), t._version) for t in tensors))
        cache = self.__dict__.setdefault("_mixed_cache", {})
        hit = cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[2]
        value = build()
        cache[key] = (stamp, list(tensors), value)
        return value

    def clear_mixed_cache(self) -> None:
        """Drop the stacked weights of mixed batches (DeltaModel calls it when a task is removed)."""
        self.__dict__.pop("_mixed_cache", None)


def root_component(model: nn.Module, attribute: str, make: Callable[[], Component]) -> Component:
    """The component a method keeps at the model's root as `model.<attribute>` (one for all of its tasks: a prompt
    table, prefixes, top-layer weights), made by `make` the first time."""
    component = getattr(model, attribute, None)
    if component is None:
        component = make()
        setattr(model, attribute, component)
    return component
