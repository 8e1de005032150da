"""Task heads: each task trains its own copy of the model's head (e.g. `classifier`) with its method, as
the parameter-efficient methods' papers do for classification (Houlsby et al. 2019 §3: a new top layer per
task beside the adapters)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from deltatune.core.component import DeltaComponent, TaskState


class TaskHeads(DeltaComponent):
    """Wraps a head module; the active task's own copy computes the output."""

    role = "head"

    def __init__(self, base_layer: nn.Module, state: TaskState):
        super().__init__(state)
        self.base_layer = base_layer
        self.heads = nn.ModuleDict()

    @property
    def tasks(self) -> list[str]:
        return list(self.heads.keys())

    def add_task(self, task: str, config=None) -> None:
        head = copy.deepcopy(self.base_layer)
        head.requires_grad_(True)
        self.heads[task] = head

    def remove_task(self, task: str) -> None:
        del self.heads[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return dict(self.heads[task].named_parameters())

    def resize(self, task: str, shapes: dict[str, torch.Size]) -> None:
        """Give a task's head the parameter shapes of a saved delta (e.g. 3 labels instead of 2)."""
        head = self.heads[task]
        for name, shape in shapes.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = head.get_submodule(owner_name) if owner_name else head
            old = getattr(owner, leaf)
            if old.shape != shape:
                setattr(owner, leaf, nn.Parameter(old.new_zeros(shape)))
                if isinstance(owner, nn.Linear) and leaf == "weight":
                    owner.out_features, owner.in_features = shape

    def forward(self, *args, **kwargs):
        if self.task_state.per_example is not None:
            return self._forward_mixed(*args, **kwargs)
        task = self.active_task
        head = self.heads[task] if task in self.heads else self.base_layer
        return head(*args, **kwargs)

    def _forward_mixed(self, *args, **kwargs) -> torch.Tensor:
        """A mixed-task batch: each distinct task's head runs on its group of examples; the outputs go back
        in batch order. Heads with different numbers of labels: the narrower outputs are padded with -inf
        in the last dim (softmax gives those labels probability 0, argmax never picks them); a task's own
        logits are `[..., :num_labels]`."""
        per_example = self.task_state.per_example
        batch = len(per_example)
        groups: dict[str, list[int]] = {}  # head's task (None: the base head) -> its examples
        for i, task in enumerate(per_example):
            groups.setdefault(task if task in self.heads else None, []).append(i)
        if len(groups) == 1:
            return self._head(next(iter(groups)))(*args, **kwargs)
        outputs = []
        for task, members in groups.items():
            index = torch.tensor(members, device=args[0].device if args else None)
            output = self._head(task)(*[_rows(a, index, batch) for a in args],
                                      **{k: _rows(v, index, batch) for k, v in kwargs.items()})
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"a mixed batch needs heads that return a tensor, not {type(output).__name__}")
            outputs.append((index, output))
        first = outputs[0][1]
        width = max(output.shape[-1] for _, output in outputs)
        result = first.new_full((batch, *first.shape[1:-1], width), float("-inf"))
        for index, output in outputs:
            result[index, ..., : output.shape[-1]] = output
        return result

    def _head(self, task: str | None) -> nn.Module:
        return self.heads[task] if task in self.heads else self.base_layer

    def merge(self, task: str) -> None:
        self.merged_task = task

    def unmerge(self) -> None:
        self.merged_task = None

    def unload(self) -> nn.Module:
        task = self.merged_task or self.active_task
        return self.heads[task] if task in self.heads else self.base_layer


def _rows(value, index: torch.Tensor, batch: int):
    """The examples `index` of a batched tensor argument; other arguments as they are."""
    is_batched = isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch
    return value.index_select(0, index) if is_batched else value
