"""LoRA: Low-Rank Adaptation (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W (d_out x d_in) is shifted by a trainable low-rank product (eq. 3 of the paper):

    h = W x + (alpha / r) * B A x          A: r x d_in,  B: d_out x r,  r << min(d_in, d_out)

A starts Kaiming-uniform and B starts at zero, so B A = 0 and training starts exactly from the base
model (section 4.1). Only W_q and W_v of each attention layer are adapted by default (section 7.1).
Because B A has W's shape it can be added into W after training (`merge`): no extra latency.

GPT-2 computes q, k and v with one fused Conv1D (`c_attn`, output [q | k | v]); as loralib's
MergedLinear does, LoRA then adapts only the q and v output rows: one (A, B) pair per projection, its B
placed at that projection's rows. The rows come from targets.py: a block [q | k | v] (GPT-2, Phi-3 with
fewer key/value heads), or scattered per head (GPT-NeoX, BLOOM: [q_h, k_h, v_h] for each head h), so a
projection's rows may be several ranges ("row groups").

PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation", §3) starts
A, B from W's top-r singular triplets instead, W = U S V^T:

    A0 = sqrt(S_r / s) V_r^T      B0 = U_r sqrt(S_r / s)      (s = alpha/r: s B0 A0 = U_r S_r V_r^T)

and trains them against the residual W - s B0 A0, so the model starts as the base. The paper (and peft)
write that residual into the frozen weight. Here the base weight stays untouched, because one base
carries several tasks (switching, mixed batches, merging): the layer keeps A0, B0 frozen and adds
s (B A - B0 A0) x, the same function with the same gradients for A and B. That difference is a plain
LoRA update of rank 2r, [B, -B0] [A; A0] (peft's conversion of a PiSSA adapter, its
`path_initial_model_for_weight_conversion`), and it is how the task runs and how it is saved: a PiSSA
delta on disk is an ordinary rank-2r LoRA delta that applies to the unmodified base model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.architectures import (
    LINEAR_TYPES,
    RowGroups,
    input_features,
    output_features,
    replace_module,
    resolve_lora_targets,
)
from deltatune.core.component import DeltaComponent, TaskState, float_reference
from deltatune.core.quantize import QuantizedLinear
from deltatune.errors import QuantizationError
from deltatune.methods import lora_experts

INITS = ["default", "pissa"]


@dataclass
class LoRA:
    """LoRA settings. `targets=None` means the architecture's W_q and W_v (see targets.py)."""

    r: int = field(default=8, metadata={"help": "rank of the update B A (paper section 4.1)"})
    alpha: float = field(default=16, metadata={"help": "scale alpha; the update is multiplied by alpha/r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA path's input"})
    targets: list[str] | str | None = field(
        default=None, metadata={"help": "module-name suffixes (`c_attn[0/3]` = a fused slice), a regex, or "
                                         "all-linear (every linear layer but the head)"}
    )
    use_rslora: bool = field(default=False, metadata={"help": "scale by alpha/sqrt(r) (Kalajdzievski 2023)"})
    init: str = field(default="default", metadata={
        "help": "default: A Kaiming-uniform, B zero (Hu et al. 2021 §4.1); pissa: A, B from W's top-r singular "
                "vectors (Meng et al. 2024), saved as a rank-2r LoRA delta of the unmodified base",
        "choices": INITS})
    pissa_niter: int = field(default=0, metadata={
        "help": "pissa: 0 = exact SVD; n > 0 = torch.svd_lowrank with n subspace iterations (fast on large W; "
                "peft's pissa_niter_n)"})
    expert_parameters: list[str] | None = field(default=None, metadata={
        "help": "3-D expert parameters of a mixture of experts (e.g. experts.gate_up_proj,experts.down_proj) that "
                "get a LoRA per expert (methods/lora_experts.py; peft's target_parameters), besides `targets`"})

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {self.init!r}")
        if self.pissa_niter < 0:
            raise ValueError(f"LoRA pissa_niter must be >= 0, got {self.pissa_niter}")
        if self.expert_parameters and (self.dropout or self.init != "default"):
            raise ValueError("LoRA on expert_parameters takes no dropout and the default init (as peft's "
                             "target_parameters): its update is added to the experts' weights, not to an input")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def saved_config(self) -> LoRA:
        """The settings a saved delta carries. A PiSSA task is saved as the plain LoRA it equals on the
        unmodified base: rank 2r with the same scaling (`LoRALinear.saved_parameters`)."""
        if self.init != "pissa":
            return self
        rank = 2 * self.r
        return replace(self, r=rank, alpha=alpha_for_scaling(self.scaling, rank, self.use_rslora), init="default",
                       pissa_niter=0)


def alpha_for_scaling(scaling: float, r: int, use_rslora: bool) -> float:
    """The alpha for which `LoRA(r, alpha, use_rslora).scaling` is `scaling`: bit for bit whenever a float alpha
    gives it (the product, else its neighbouring floats); with rsLoRA a few odd alphas stay 1 ulp off."""
    denominator = math.sqrt(r) if use_rslora else r
    alpha = scaling * denominator
    for _ in range(8):
        quotient = alpha / denominator
        if quotient == scaling:
            break
        alpha = math.nextafter(alpha, math.inf if quotient < scaling else -math.inf)
    return alpha


class LoRALinear(DeltaComponent):
    """A linear (or GPT-2 Conv1D) layer plus one low-rank update per task, on chosen groups of output rows.

    For each task: `lora_A[task]` is (G*r, d_in) and `lora_B[task]` is (w_1 + ... + w_G, r) for G row groups
    of w_g rows each (a group: one projection's rows of a fused layer, possibly several ranges); row block g
    of B pairs with row block g of A. With one group covering the whole output these are exactly the
    paper's A (r x d_in) and B (d_out x r).
    """

    def __init__(self, base_layer: nn.Module, groups: RowGroups | None, state: TaskState):
        super().__init__(state)
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"LoRA needs nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.in_features = input_features(base_layer)
        self.out_features = output_features(base_layer)
        self.groups = groups or [[(0, self.out_features)]]
        self.widths = [sum(end - start for start, end in group) for group in self.groups]
        # each group's output rows, in B's row order: (w_g,)
        self.__dict__["group_rows"] = [torch.cat([torch.arange(a, b) for a, b in group]) for group in self.groups]
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D: weight is (d_in, d_out)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        # PiSSA tasks: the frozen initial (A0, B0), buffers of one small module per task (moved by .to())
        self.pissa_initial = nn.ModuleDict()

    # HF code sometimes reads `layer.weight` / `layer.bias` directly
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def tasks(self) -> list[str]:
        return list(self.lora_A.keys())

    @property
    def slices(self) -> list[tuple[int, int]]:
        """Every adapted range of output rows, in order."""
        return sorted(span for group in self.groups for span in group)

    @property
    def whole(self) -> bool:
        return self.groups == [[(0, self.out_features)]]

    def saved_layout(self) -> dict | None:
        """The adapted row groups of a fused layer (None for a whole layer)."""
        return None if self.whole else {"rows": [[list(span) for span in group] for group in self.groups],
                                        "out_features": self.out_features}

    def add_task(self, task: str, config: LoRA) -> None:
        n_groups = len(self.groups)
        weight = float_reference(self.base_layer)  # a quantized base: A and B in its compute dtype (QLoRA §3)
        if config.init == "pissa":
            lora_A, lora_B = self._pissa_factors(config)
            initial = nn.Module()
            initial.register_buffer("A", lora_A.clone(), persistent=False)
            initial.register_buffer("B", lora_B.clone(), persistent=False)
            self.pissa_initial[task] = initial
        else:
            lora_A = torch.empty(n_groups * config.r, self.in_features, dtype=weight.dtype, device=weight.device)
            # Kaiming-uniform as nn.Linear initialises its weight (and as loralib/peft do for A)
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
            lora_B = torch.zeros(sum(self.widths), config.r, dtype=weight.dtype, device=weight.device)
        self.lora_A[task] = nn.Parameter(lora_A)
        self.lora_B[task] = nn.Parameter(lora_B)
        self.lora_dropout[task] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[task] = config.scaling
        self.rank[task] = config.r

    def _pissa_factors(self, config: LoRA) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA's A0 (G*r, d_in), B0 (sum w_g, r): per row group, W_g's top-r singular triplets with S_r/s
        split evenly between the factors (Meng et al. 2024 §3; as peft's `pissa_init`), in W's dtype."""
        if isinstance(self.base_layer, QuantizedLinear):  # the weight the layer multiplies by: dequant(W_q)
            weight = self.base_layer.dequantize()
        else:
            weight = self.base_layer.weight.detach()
            weight = weight.T if self.transposed else weight  # (d_out, d_in)
        A_blocks, B_blocks = [], []
        for rows in self.group_rows:
            W = weight[rows.to(weight.device)].to(torch.float32)  # (w_g, d_in); SVD in float32 also for bf16/fp16
            if config.pissa_niter:
                U, S, V = torch.svd_lowrank(W, q=config.r, niter=config.pissa_niter)  # W ~ U diag(S) V^T
                Vh = V.T
            else:
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            root = (S[: config.r] / config.scaling).sqrt()  # (r,)
            A_blocks.append(root[:, None] * Vh[: config.r])  # (r, d_in)
            B_blocks.append(U[:, : config.r] * root)  # (w, r)
        return torch.cat(A_blocks).to(weight.dtype), torch.cat(B_blocks).to(weight.dtype)

    def remove_task(self, task: str) -> None:
        if self.merged_task == task:
            self.unmerge()
        for store in (self.lora_A, self.lora_B, self.lora_dropout):
            del store[task]
        if task in self.pissa_initial:
            del self.pissa_initial[task]
        del self.scaling[task], self.rank[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A[task], "lora_B": self.lora_B[task]}

    def saved_parameters(self, task: str) -> dict[str, torch.Tensor]:
        """What `save_delta` writes: A and B, or for a PiSSA task the rank-2r pair of `factors`, a plain LoRA
        delta of the unmodified base (with `LoRA.saved_config`)."""
        A, B, _ = self.factors(task)
        return {"lora_A": A.detach(), "lora_B": B.detach()}

    def factors(self, task: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(A, B, rank) that the task's update s B A is computed from: its own A and B, or for a PiSSA task
        [A; A0] and [B, -B0], rank 2r, whose product is B A - B0 A0 (peft's PiSSA-to-LoRA conversion),
        stacked per row group."""
        A, B, r = self.lora_A[task], self.lora_B[task], self.rank[task]
        if task not in self.pissa_initial:
            return A, B, r
        initial, n_groups = self.pissa_initial[task], len(self.groups)
        # (G, r, d_in) and (G, r, d_in) -> (G, 2r, d_in): each group's rows of A, then its rows of A0
        A = torch.cat([A.view(n_groups, r, -1), initial.A.view(n_groups, r, -1)], dim=1).flatten(0, 1)
        # (w_g, r) and (w_g, r) -> (w_g, 2r) per group: its B beside its -B0
        B = torch.cat([torch.cat([B_g, -B0_g], dim=1)
                       for B_g, B0_g in zip(B.split(self.widths), initial.B.split(self.widths))])
        return A, B, 2 * r

    def delta_weight(self, task: str) -> torch.Tensor:
        """(alpha/r) B A laid out like the base weight's output rows: (d_out, d_in), zeros elsewhere."""
        A, B, r = self.factors(task)
        delta = torch.zeros(self.out_features, self.in_features, dtype=A.dtype, device=A.device)
        for g, (rows, B_g) in enumerate(zip(self.group_rows, B.split(self.widths))):
            # (w_g, r) @ (r, d_in) -> (w_g, d_in); under bf16 autocast the product is bf16: stored in A's dtype
            delta[rows.to(A.device)] = (B_g @ A[g * r : (g + 1) * r]).to(delta.dtype)
        return delta * self.scaling[task]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.task_state.per_example is not None:
            if self.task_state.batch_dim == 1:  # length-first hidden states (XLNet): examples in dim 1
                return self._forward_mixed(x.transpose(0, 1)).transpose(0, 1)
            return self._forward_mixed(x)
        result = self.base_layer(x)
        task = self.active_task
        if task is None or task not in self.lora_A or self.merged_task == task:
            return result
        A, B, _ = self.factors(task)
        B = self.placed(B)
        x = self.lora_dropout[task](x)
        after_A = F.linear(x if x.dtype == A.dtype else x.to(A.dtype), A)  # (..., d_in) @ (d_in, G*r)
        # Scale the narrow (..., S*r) tensor, not the (..., d_out) update: `B(A(x)) * scaling` costs one more
        # full-width pass forward and one backward, and a full-width tensor. (Measured per layer: adding
        # with addmm or in place is no faster in forward + backward; in-place writes into Linear's output,
        # a view, make autograd copy the whole output in backward.)
        update = F.linear(after_A * self.scaling[task], B)  # (..., G*r) @ (G*r, d_out)
        return result + update.to(result.dtype)

    def placed(self, B: torch.Tensor) -> torch.Tensor:
        """A task's B (sum w_g, r) over the whole output, (d_out, G*r): group g's (w_g, r) block at its rows and
        columns g*r:(g+1)*r, zeros elsewhere, so that one product updates every group. B itself for the whole
        output. (This is also the exact form fused rows take in Hugging Face peft's format, see
        formats/peft_methods.py.)"""
        if self.whole:
            return B
        blocks = torch.block_diag(*B.split(self.widths))  # (sum w_g, G*r)
        rows = torch.cat(self.group_rows).to(B.device)
        return B.new_zeros(self.out_features, blocks.shape[1]).index_copy(0, rows, blocks)

    def _forward_mixed(self, x: torch.Tensor) -> torch.Tensor:
        """A mixed-task batch (`task_state.per_example`): each example gets its own task's update, batched.

        The base matmul is shared. Every task's A and B are stacked once (cached, see `stacked`), zero-padded
        to the largest rank r_max, with B scaled by alpha/r and placed at its group's output columns, plus a
        zero row for examples whose task has no LoRA here ("base", another method). Each example gathers
        its row: two batched matmuls, no loop over examples or tasks."""
        result = self.base_layer(x)
        if self.merged_task is not None:
            raise RuntimeError(f"{self.merged_task!r} is merged into this layer: unmerge() before a mixed batch")
        if self.idle_in_mixed_pass():
            return result
        tensors = [*self.lora_A.values(), *self.lora_B.values()]
        A_all, B_all, dropout = self.stacked("lora", tensors, self._stack_for_mixed)
        batch = x.shape[0]
        rows = self.example_rows(batch, x.device)
        x = x.reshape(batch, -1, self.in_features).to(A_all.dtype)  # (B, L, d_in)
        stacked_tasks, width = A_all.shape[0], A_all.shape[2]
        if self.dense_mixed(x.shape[1], stacked_tasks):  # decode steps: all tasks' updates, the others' masked
            A_side = A_all.permute(1, 0, 2).reshape(self.in_features, -1)  # (d_in, (T+1)*G*r_max): a view
            B_side = B_all.reshape(-1, self.out_features)  # ((T+1)*G*r_max, d_out): a view
            after_A = (x @ A_side).view(batch, x.shape[1], stacked_tasks, width)
            after_A = (after_A * self.task_mask(rows, stacked_tasks, after_A.dtype)).to(result.dtype)
            out = result.reshape(-1, self.out_features)
            return out.addmm_(after_A.view(out.shape[0], -1), B_side.to(result.dtype)).view(result.shape)
        if self.training and bool(dropout.any()):  # each example with its task's dropout rate
            p = dropout.to(x.device, x.dtype)[rows].view(batch, 1, 1)
            x = x * (torch.rand_like(x) >= p) / (1 - p)
        after_A = torch.bmm(x, A_all[rows]).to(result.dtype)  # (B, L, d_in) @ (B, d_in, G*r_max) -> (B, L, G*r_max)
        B_rows = B_all[rows].to(result.dtype)  # (B, G*r_max, d_out)
        out = result.reshape(batch, -1, self.out_features)
        if torch.is_grad_enabled() and (out.requires_grad or after_A.requires_grad or B_rows.requires_grad):
            # training: out of place (an in-place write into Linear's output makes backward copy it)
            return torch.baddbmm(out, after_A, B_rows).view(result.shape)
        # inference: accumulate into the base output in place (measured: 3.5x less added time than a new tensor)
        return out.baddbmm_(after_A, B_rows).view(result.shape)

    def _stack_for_mixed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A_all^T (T+1, d_in, G*r_max), B_all (T+1, G*r_max, d_out) scaled, per-task dropout rates (T+1,)."""
        tasks, n_groups = self.tasks, len(self.groups)
        factors = {task: self.factors(task) for task in tasks}
        r_max = max(r for _, _, r in factors.values())
        reference = self.lora_A[tasks[0]]
        A_all = reference.new_zeros(len(tasks) + 1, n_groups * r_max, self.in_features)
        B_all = reference.new_zeros(len(tasks) + 1, n_groups * r_max, self.out_features)
        for t, task in enumerate(tasks):
            A, B, r = factors[task]
            B = B * self.scaling[task]
            for g, (rows, B_g) in enumerate(zip(self.group_rows, B.split(self.widths))):
                A_all[t, g * r_max : g * r_max + r] = A[g * r : (g + 1) * r]
                B_all[t, g * r_max : g * r_max + r, rows.to(B.device)] = B_g.T  # (r, w_g)
        dropout = torch.tensor([getattr(self.lora_dropout[task], "p", 0.0) for task in tasks] + [0.0])
        # stored (d_in, T+1, G*r_max), returned as the (T+1, d_in, G*r_max) view the gather path indexes: the dense
        # path's (d_in, (T+1)*G*r_max) is then a view of the same storage (one copy of the stack, not two)
        return A_all.permute(2, 0, 1).contiguous().permute(1, 0, 2), B_all, dropout

    def merge(self, task: str) -> None:
        """W <- W + (alpha/r) B A; the forward pass then skips the LoRA path.

        The pre-merge W is kept so that `unmerge` restores it bit for bit (W + ΔW - ΔW is not W in
        floating point); `merge_and_unload` drops that copy."""
        if self.merged_task == task:  # DoRA's merge may have merged it already (methods/dora.py)
            return
        if isinstance(self.base_layer, QuantizedLinear):
            raise QuantizationError(
                f"cannot merge LoRA task {task!r} into a {self.base_layer.scheme}-quantized weight: W + (alpha/r) B A "
                f"is not representable in {self.base_layer.scheme} without rounding the update away (QLoRA keeps the "
                f"adapter beside the quantized weight). Use the task unmerged (one extra low-rank product per "
                f"layer), or load the base without --quantize and merge there (the delta is portable).")
        if self.merged_task is not None:
            self.unmerge()
        weight = self.base_layer.weight
        self.__dict__["unmerged_weight"] = weight.detach().clone()
        with torch.no_grad():
            delta = self.delta_weight(task).to(weight.dtype)
            weight += delta.T if self.transposed else delta
        self.merged_task = task

    def unmerge(self) -> None:
        if self.merged_task is None:
            return
        with torch.no_grad():
            self.base_layer.weight.copy_(self.__dict__.pop("unmerged_weight"))
        self.merged_task = None

    def unload(self) -> nn.Module:
        self.__dict__.pop("unmerged_weight", None)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"rows={self.groups}, tasks={self.tasks}"


def inject(model: nn.Module, config: LoRA, task: str, state: TaskState, exclude: list[str]) -> None:
    """Wrap every target layer in a LoRALinear (once) and give it fresh A, B for `task`."""
    for name, groups in resolve_lora_targets(model, config.targets).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer, groups, state)
            replace_module(model, name, layer)
        elif (groups or [[(0, layer.out_features)]]) != layer.groups:
            raise ValueError(
                f"{name} already carries LoRA on output rows {layer.groups}; a second LoRA task must "
                f"adapt the same rows (asked for {groups})"
            )
        layer.add_task(task, config)
    if config.expert_parameters:
        lora_experts.inject(model, config, task, state, exclude)
