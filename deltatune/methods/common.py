"""What every method's injected modules share: the active-task switch and per-task parameters.

A `DeltaComponent` is a small module that a method puts into the base model (a LoRA wrapper around a
linear layer, a bias delta hooked onto a layer, an adapter, a prompt, a task head). It keeps one set
of parameters *per task* — `ParameterDict`s keyed by the task name — so that several task deltas live
on one base model, and reads which task is active from a `TaskState` shared by all components of one
`DeltaModel`. Switching tasks is therefore one assignment, and exact.
"""

from __future__ import annotations

import re
from typing import ClassVar

from torch import nn

from deltatune.errors import TaskError

TASK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,63}$")
BASE_TASK = "base"  # the name of "no delta": the plain base model


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


class TaskState:
    """Which task the model runs now; shared by reference between a DeltaModel and its components.

    `active` is one task name (or None for the base model). `per_example` is set only during a
    mixed-task forward pass: a list with one task name per example of the batch.
    """

    def __init__(self) -> None:
        self.active: str | None = None
        self.per_example: list[str | None] | None = None


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
    """

    method: ClassVar[str] = ""
    root_level: ClassVar[bool] = False  # True: keys are not prefixed with the component's module name
    # how its parameters are counted in reports: the method's own ("method"), base-model normalisation
    # layers a method also trains ("norm", e.g. adapters' LayerNorms), or the task head ("head")
    role: ClassVar[str] = "method"

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
