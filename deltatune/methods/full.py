"""Full fine-tuning: every weight trains. The reference the parameter-efficient methods are measured
against (the "FT" rows of Hu et al. 2021, tables 2 and 3).

A full-fine-tuning "delta" is the whole model, so deltatune stores it as such. Several full tasks can
still share one DeltaModel: the weights of the inactive ones wait in memory and are copied in when a
task becomes active (exact, but each task costs one model's worth of memory — which is the point the
document makes about full fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deltatune.core.component import DeltaComponent, TaskState, strip_wrappers
from deltatune.errors import DeltaTuneError


@dataclass
class FullFineTune:
    """Full fine-tuning: no settings; all base weights (and the head) train."""



class FullWeights(DeltaComponent):
    """Keeps per-task copies of all base weights and swaps the active task's copy into the model."""

    root_level = True  # its keys are the model's own parameter names

    def __init__(self, model: nn.Module, exclude: list[str], state: TaskState):
        super().__init__(state)
        added = component_parameter_ids(model)
        self.__dict__["weights"] = {  # normalised name -> the model's own Parameter
            strip_wrappers(name): param
            for name, param in model.named_parameters()
            if id(param) not in added
            and not any(name == e or name.startswith(e + ".") for e in exclude)
        }
        self.__dict__["base_snapshot"] = {n: p.detach().clone() for n, p in self.weights.items()}
        self.__dict__["stored"] = {}  # task -> {name: tensor}, for full tasks not in the model now
        self.__dict__["loaded_task"] = None  # whose weights the model's parameters hold now

    @property
    def tasks(self) -> list[str]:
        return [*self.stored, *([self.loaded_task] if self.loaded_task else [])]

    def add_task(self, task: str, config: FullFineTune) -> None:
        self.stored[task] = {n: t.clone() for n, t in self.base_snapshot.items()}
        self.on_switch()

    def remove_task(self, task: str) -> None:
        if self.loaded_task == task:
            self._load(None)
        self.stored.pop(task, None)

    def task_parameters(self, task: str) -> dict[str, torch.Tensor]:
        return dict(self.weights) if task == self.loaded_task else self.stored[task]

    def on_switch(self) -> None:
        """Make the model's weights those of the active task (or the base weights)."""
        wanted = self.active_task if self.active_task in self.tasks else None
        if wanted != self.loaded_task:
            self._load(wanted)

    def _load(self, task: str | None) -> None:
        with torch.no_grad():
            if self.loaded_task is not None:  # park the current task's weights
                self.stored[self.loaded_task] = {n: p.detach().clone() for n, p in self.weights.items()}
            source = self.base_snapshot if task is None else self.stored.pop(task)
            for name, param in self.weights.items():
                param.copy_(source[name])
        self.__dict__["loaded_task"] = task

    def check_mixed(self, tasks: set[str | None]) -> None:
        """Full fine-tuning deltas ARE the weights: examples cannot each run on their own copy in one pass."""
        full = sorted(task for task in tasks if task in self.tasks)
        if full:
            raise DeltaTuneError(f"full fine-tuning tasks {full} cannot be mixed in a batch (each is a whole copy "
                                 f"of the model's weights); run them alone with use(task) and no tasks=")
        if self.loaded_task is not None:
            raise DeltaTuneError(f"the model holds the weights of full fine-tuning task {self.loaded_task!r} (the "
                                 f"active task); call use('base') or use() another task before a mixed batch")

    def merge(self, task: str) -> None:
        self.merged_task = task  # the weights are already in the model

    def unmerge(self) -> None:
        self.merged_task = None

    def unload(self) -> None:
        return None



def component_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the parameters other methods added (not the base layers they wrap)."""
    owned: set[int] = set()
    for module in model.modules():
        if isinstance(module, DeltaComponent):
            wrapped = getattr(module, "base_layer", None)
            inner = {id(p) for p in wrapped.parameters()} if isinstance(wrapped, nn.Module) else set()
            owned |= {id(p) for p in module.parameters()} - inner
    return owned


def inject(model: nn.Module, config: FullFineTune, task: str, state: TaskState, exclude: list[str]) -> None:
    """Full fine-tuning adds no layers: one FullWeights at the model's root keeps the tasks' weights."""
    component = getattr(model, "deltatune_full", None)
    if component is None:
        component = FullWeights(model, exclude, state)
        model.deltatune_full = component
    component.add_task(task, config)
