"""One input, several tasks: the frozen lower blocks run once for all of the input's rows.

AdapterDrop's argument (Rücklé et al. 2021, §3 "AdapterDrop" and §4, "parallel inference for several
tasks"): when no task changes the lowest s blocks, their output for an input is the same for every
task, so it is computed once and only the blocks above run per task. Top-k fine-tuning (s = L - k) and
AdapterDrop (s = skip_layers) leave the lower blocks untouched by construction.

In a mixed batch (`model(**batch, tasks=[...])`) the same input appears once per task that should read
it. If every task of the batch leaves the lowest s > 0 blocks alone, the copies of each input go
through those blocks as one row and are copied back out to their rows after block s - 1: the blocks
compute exactly what they would for each copy, so the outputs are unchanged, and the lower blocks cost
one row per distinct input instead of one per (input, task). Models with one stack of blocks
(encoders, decoders); encoder-decoders are run as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deltatune.core.architectures import block_index, block_lists
from deltatune.core.component import DeltaComponent, strip_wrappers

BATCHED_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds")


def untouched_blocks(model, task: str | None) -> int:
    """How many of the lowest blocks compute the base model's function for `task`'s examples: the index of
    the lowest block holding one of its parameters (0 if it changes the inputs or anything below the
    blocks; the number of blocks if it changes only what comes after them, or nothing: "base")."""
    stacks = block_lists(model.base_model)
    (stack_name, stack), = stacks.items()
    if task is None:
        return len(stack)
    if any(task in c.tasks for c in model._input_components()):
        return 0  # prompt tuning: the sequence itself differs
    order = [strip_wrappers(name) for name, module in model.base_model.named_modules()
             if not isinstance(module, DeltaComponent)]
    below = set(order[: order.index(stack_name)])  # embeddings and everything else before the blocks
    known = set(order)
    lowest = len(stack)
    for key in model.task_parameters(task):
        if key.startswith(stack_name + "."):
            lowest = min(lowest, block_index(key))
            continue
        module = key.rpartition(".")[0]
        while module and module not in known:  # a component's own parameter: find its base module
            module = module.rpartition(".")[0]
        if not module or module in below:
            return 0
    return lowest


@contextmanager
def share_lower_blocks(model, per_example: list[str | None], kwargs: dict[str, Any]) -> Iterator[None]:
    """Within: a forward of `model.base_model` on this mixed batch runs each distinct input once through
    the blocks that no task of the batch changes (nothing happens if there are none, or no repeats)."""
    stacks = block_lists(model.base_model)
    batched = [kwargs[name] for name in BATCHED_INPUTS if isinstance(kwargs.get(name), torch.Tensor)]
    if len(stacks) != 1 or not batched:
        yield
        return
    keep, inverse = distinct_rows(batched)
    if len(keep) == len(per_example):  # no input repeats (the usual batch): nothing to share, nothing to look up
        yield
        return
    shared = min(untouched_blocks(model, task) for task in set(per_example))
    if shared == 0:
        yield
        return
    (stack,) = stacks.values()
    state, batch = model.task_state, len(per_example)
    keep, inverse = keep.to(batched[0].device), inverse.to(batched[0].device)

    def compress(block: nn.Module, args: tuple, block_kwargs: dict):
        if block is stack[0]:  # from here on, the components see one row per distinct input
            state.per_example = [per_example[i] for i in keep.tolist()]
        return _take(args, keep, batch), {k: _take(v, keep, batch) for k, v in block_kwargs.items()}

    def expand(block: nn.Module, args: tuple, output):
        state.per_example = per_example
        if isinstance(output, tuple):
            return (output[0].index_select(0, inverse), *output[1:])
        return output.index_select(0, inverse)

    hooks = [stack[i].register_forward_pre_hook(compress, with_kwargs=True) for i in range(shared)]
    hooks.append(stack[shared - 1].register_forward_hook(expand))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def distinct_rows(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep, inverse): the first row of each distinct input (over all `tensors`), and for every row the
    position of its input in `keep`."""
    rows = [b"".join(t[i].detach().cpu().numpy().tobytes() for t in tensors) for i in range(tensors[0].shape[0])]
    position: dict[bytes, int] = {}
    keep, inverse = [], []
    for i, row in enumerate(rows):
        if row not in position:
            position[row] = len(keep)
            keep.append(i)
        inverse.append(position[row])
    return torch.tensor(keep), torch.tensor(inverse)


def _take(value: Any, index: torch.Tensor, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, index)
    if isinstance(value, tuple | list):
        return type(value)(_take(v, index, batch) for v in value)
    return value
