"""Several processes (torchrun / `accelerate launch`): the helpers the training loop calls when it is one of
several ranks. In one process each of them is a no-op or the plain single-process computation.

- DDP (the default): every rank holds the whole model; `accelerate` all-reduces the trainable gradients.
- FSDP2 (`--fsdp`, `shard_model`): every parameter is sharded over the ranks; `full_parameters` gathers
  them while the model evaluates or is saved.
- Evaluation is split over the ranks (`evaluate_sharded`); decisions all ranks must take together
  (stop on a signal, the time budget) use `max_over_ranks`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from deltatune.delta import DeltaModel
from deltatune.errors import TrainingError
from deltatune.evaluate import score_predictions, task_predictions
from deltatune.methods.registry import method_entry


def launched() -> bool:
    """Started by torchrun / accelerate launch (a process group exists, maybe of one process)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def max_over_ranks(values: list[float], device) -> list[float]:
    """Each value's maximum over all ranks (the values themselves in one process)."""
    if not launched():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor.tolist()


def shard_model(model: DeltaModel, device) -> None:
    """FSDP2 (`fully_shard`): each transformer block is one unit, the rest (embeddings, task head, prompts)
    the root unit. Per-parameter sharding lets frozen base weights and trainable delta tensors share a unit.
    Every rank built the same model from the same seed, so the shards fit together."""
    from torch.distributed.fsdp import fully_shard

    holding = sorted({info["method"] for info in model.task_info.values() if method_entry(info["method"]).updates_base})
    if holding:
        method = holding[0]
        raise TrainingError(f"--fsdp does not work with --method {method}, which keeps references to the model's "
                            f"parameters that sharding replaces; use --method {method} without --fsdp (DDP)")
    model.to(device)
    blocks = set(getattr(model.base_model, "_no_split_modules", None) or ())  # e.g. {"BertLayer", ...}
    for layers in [module for module in model.modules() if isinstance(module, torch.nn.ModuleList)]:
        for block in layers:
            if type(block).__name__ in blocks:
                fully_shard(block, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)  # the root's parameters are needed again for backward


@contextmanager
def full_parameters(model: DeltaModel):
    """Under FSDP: every rank holds the complete parameters inside the block (to save the delta whole, and
    to evaluate with forward passes that need no other rank), sharded again after it. Else: nothing."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit in units:
            unit.set_reshard_after_forward(unit is not model, recurse=False)  # as shard_model set it
            unit.reshard()


def evaluate_sharded(model, tokenizer, task, examples: list[dict], max_length: int, rank: int = 0,
                     world: int = 1) -> dict[str, float]:
    """`evaluate` with the examples split over the ranks: each one predicts every `world`-th example, the
    predictions are gathered, and every rank computes the same metrics from all of them."""
    from accelerate.utils import gather_object

    mine = examples[rank::world]  # none where there are fewer examples than ranks
    predictions = task_predictions(model, tokenizer, task, mine, max_length) if mine else []
    ordered: list = [None] * len(examples)
    for source_rank, part in enumerate(gather_object([predictions])):
        ordered[source_rank::world] = part
    return score_predictions(task, examples, ordered)
