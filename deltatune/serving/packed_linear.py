"""A frozen linear layer whose weight is also held in oneDNN's blocked layout, for inference on a CPU (fp32, bf16).

A decoder's output projection is the largest single matrix product of a decode step (SmolLM2: 576 -> 49,152,
28M weights, the vocabulary times the hidden size). `torch.nn.functional.linear` hands it to MKL's sgemm, which
re-packs the weight into its own blocks on every call; at the few rows of a decode step (one per running request)
that copy costs more than the arithmetic. oneDNN can take the weight reordered once ("prepacked") for a given batch
size and skip the copy: measured here (2-core AMD EPYC, AVX2, one thread), 16 rows x 576 -> 49,152 took 31-34 ms
prepacked against 50-57 ms through `F.linear`, 15 vs 48 ms at 4 rows. vLLM's CPU backend does the same for every
linear layer (`vllm/model_executor/layers/utils.py`, its oneDNN GEMM with prepacked weights).

`deltatune serve --packed-head` uses it; it is off by default because the whole server measured 0.84-0.86x the
tokens/s with it on this 2-core machine (two OpenMP threads; its worker thread then idles ~40% of the time, with
10x the system time), although one decode step alone is 0.87x the CPU time with it (docs/results/vs_vllm.md).

`deltatune serve --packed-linears` packs every plain linear layer the same way (`pack_linear_layers`: the blocks'
projections too, before the deltas wrap them), as vLLM does; the blocks' products alone measured 0.71-0.86x the time
of `F.linear`'s at 8-16 rows (1-2 threads). It is the command's default where the packed copy (a second copy of
every weight: `packing_bytes`) takes at most half the memory available: with two one-thread decode loops it served
1.10-1.24x the tokens/s on the base model and 1.05-1.27x on 8 mixed LoRAs on this 2-core machine, alternated
(docs/results/decode_loop_engine.md, vs_vllm.md); with one two-thread loop 0-9%. Layers that read the same input
(q/k/v, gate/up) are packed as one weight (`FusedSiblings`), as vLLM fuses them: one product instead of three or
two, 1.07-1.18x the tokens/s on the base against the same layers packed apart (on 8 mixed LoRAs: noise).

The products are oneDNN's, not MKL's: in fp32 they differ in the last bits (a logit's difference from `F.linear`
is at most a few 1e-6 on SmolLM2), so a greedy token can differ where two logits tie to that precision. bf16
weights are packed too where oneDNN has native bf16 math (AVX512-BF16 or AMX: `packed_dtypes`); there `F.linear`
itself runs oneDNN's bf16 kernel, and the prepacked product is bit-identical to it (measured on a Xeon with AMX:
the blocks' products at 8 rows on one thread 24 ms prepacked against 38 ms, fp32 prepacked 56 ms). Training,
gradients, fp16 and other devices take `F.linear` unchanged.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.architectures import unwrap


def prepacking_available() -> bool:
    """Whether this torch build has oneDNN (mkldnn) for the CPU, whose prepacked linear `PackedLinear` calls."""
    return torch.backends.mkldnn.is_available()


@functools.cache
def packed_dtypes() -> tuple[torch.dtype, ...]:
    """The weight dtypes packed here: fp32, and bf16 where oneDNN has native bf16 math on this CPU (AVX512-BF16 or
    AMX; emulated bf16 would be slower than `F.linear`'s)."""
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


class PackedLinear(nn.Linear):
    """`linear`'s own weight and bias (the same Parameters: tied weights stay tied), plus a copy of the weight
    reordered for oneDNN, made once and made again if the weight is changed in place or cast to another dtype
    (`model.to(torch.bfloat16)` after packing). The prepacked product runs
    only where it gives the same function: inputs and weight of one packed dtype on the CPU, no gradient to record.
    A layer in a `FusedSiblings` group (q/k/v, gate/up) takes its output from the group's one product instead."""

    def __init__(self, linear: nn.Linear, batch_size: int, pack: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.batch_size = batch_size  # the rows oneDNN lays the weight out for (other row counts work too)
        self._packed, self._packed_from = None, None  # the pack; the weight's (version, dtype) it was made from
        self.siblings: tuple[FusedSiblings, int] | None = None  # (its group, its place in it)
        if pack:  # pack=False: packed by its `FusedSiblings` group, or by `_repack` later
            self._repack()

    def _repack(self) -> None:
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_size=self.batch_size)
        self._packed_from = (self.weight._version, self.weight.dtype)

    def _prepacked_applies(self, inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad):
            return False  # a gradient to record: the oneDNN product has none
        return inputs.dtype == weight.dtype and weight.dtype in packed_dtypes() and inputs.is_cpu and weight.is_cpu

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        weight = self.weight  # read once: a Parameter is looked up through Module.__getattr__ (a decode step: ~120)
        if not self._prepacked_applies(inputs, weight):
            return F.linear(inputs, weight, self.bias)
        if self.siblings is not None:
            group, place = self.siblings
            return group.output(place, inputs)
        if self._packed_from != (weight._version, weight.dtype):  # written in place or cast since it was packed
            self._repack()
        return torch.ops.mkldnn._linear_pointwise(inputs, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        fused = f", fused with its siblings ({len(self.siblings[0].layers)})" if self.siblings else ""
        return f"{super().extra_repr()}, prepacked for {self.batch_size} rows{fused}"


class FusedSiblings:
    """Linear layers that read the same input (attention's q, k and v projections; the gated MLP's gate and up)
    packed as ONE weight, their rows stacked: one product, then each layer takes its columns of it, as vLLM's
    `QKVParallelLinear` and `MergedColumnParallelLinear` compute them. The layers stay separate modules (deltas wrap
    each: a LoRA on q and v only), so the group cannot know that they are called with the same input: the first
    call computes every layer's part and keeps them (per thread: the decode loops); a sibling called next with the
    very same tensor takes its part, anything else (another input, a part already taken) computes the product
    anew. Each part is handed out once, so a caller adding into its part in place (LoRA's mixed decode does) never
    touches another's."""

    def __init__(self, layers: list[PackedLinear], batch_size: int):
        self.layers, self.batch_size = layers, batch_size
        self.widths = [layer.out_features for layer in layers]
        self._local = threading.local()
        self._repack()
        for place, layer in enumerate(layers):
            layer.siblings, layer._packed = (self, place), None  # the group's pack replaces any of the layer's own

    def _repack(self) -> None:
        with torch.no_grad():
            weight = torch.cat([layer.weight.detach() for layer in self.layers])
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_size=self.batch_size)
            biases = [layer.bias for layer in self.layers]
            self._bias = None if biases[0] is None else torch.cat([bias.detach() for bias in biases])
        self._versions = self._weight_versions()

    def _weight_versions(self) -> list[tuple[int, torch.dtype]]:
        biases = [layer.bias for layer in self.layers if layer.bias is not None]
        tensors = [layer.weight for layer in self.layers] + biases
        return [(tensor._version, tensor.dtype) for tensor in tensors]

    def parts(self, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every layer's output for `inputs` from one product (views of it), for a caller that knows they all read
        `inputs` (the written decode step, where the layers are its own, unwrapped and unhooked)."""
        if self._versions != self._weight_versions():  # a weight or bias written in place or cast since the pack
            self._repack()
        product = torch.ops.mkldnn._linear_pointwise(inputs, self._packed, self._bias, "none", [], "")
        return product.split_with_sizes(self.widths, -1)  # not Tensor.split: Python

    def output(self, place: int, inputs: torch.Tensor) -> torch.Tensor:
        local = self._local
        if getattr(local, "inputs", None) is not inputs or local.taken[place]:
            local.inputs, local.parts = inputs, self.parts(inputs)
            local.taken = [False] * len(self.layers)
        local.taken[place] = True
        part = local.parts[place]
        if all(local.taken):  # every part handed out: nothing kept between two passes
            local.inputs = local.parts = None
        return part


def sibling_outputs(layers: tuple[nn.Module, ...], inputs: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """The outputs of `layers` for `inputs` through their `FusedSiblings` group's one product, where `layers` are that
    whole group, each a plain `PackedLinear` (no delta wrapping it), unhooked, with the prepacked product applying;
    else None (call them as modules). What calling each layer gives, without the per-call bookkeeping."""
    first = layers[0]
    if type(first) is not PackedLinear or first.siblings is None:
        return None
    group = first.siblings[0]
    if (len(group.layers) != len(layers) or not first._prepacked_applies(inputs, first.weight)
            or any(layer is not member or layer._forward_hooks or layer._forward_pre_hooks
                   for layer, member in zip(layers, group.layers))):
        return None
    return group.parts(inputs)


FUSABLE_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama, Mistral, Qwen2, Gemma...


def _packable(module: nn.Module | None) -> bool:
    """A plain `nn.Linear` on the CPU (not a subclass: quantized, delta-wrapped or already packed) of a dtype packed
    here (`packed_dtypes`)."""
    return (type(module) is nn.Linear and module.weight.dtype in packed_dtypes()
            and module.weight.device.type == "cpu")


def pack_output_layer(model: nn.Module, batch_size: int) -> bool:
    """Swap a transformers model's output projection (`get_output_embeddings()`, the LM head) for a `PackedLinear`
    sharing its weight. Returns whether it did: not without oneDNN, nor for a head that is not a plain
    `nn.Linear` of a packed dtype (a quantized or delta-wrapped one; bf16 without native bf16 math)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not prepacking_available() or not _packable(head):
        return False
    model.set_output_embeddings(PackedLinear(head, batch_size))
    return True


def packing_bytes(model: nn.Module) -> int:
    """The memory `pack_linear_layers` would add: one packed copy of each distinct weight it would pack."""
    weights = {id(module.weight): module.weight for module in model.modules() if _packable(module)}
    return sum(weight.numel() * weight.element_size() for weight in weights.values())


def pack_linear_layers(model: nn.Module, batch_size: int) -> int:
    """Swap every plain CPU `nn.Linear` of a model (fp32; bf16 with native bf16 math: `packed_dtypes`), the blocks'
    projections and the head, for a `PackedLinear` sharing its weight, as vLLM's CPU backend prepacks every linear
    layer; siblings that read the same input (`FUSABLE_SIBLINGS` of one parent, all packed, with biases alike) are
    packed as one `FusedSiblings` group. Deltas attached later wrap the packed layers like any linear layer. Returns
    how many it swapped (0 without oneDNN)."""
    if not prepacking_available():
        return 0
    swapped = []  # packed below: a fused sibling is packed once, in its group's weight
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _packable(child):
                swapped.append(PackedLinear(child, batch_size, pack=False))
                setattr(parent, name, swapped[-1])
    for parent in list(model.modules()):
        for names in FUSABLE_SIBLINGS:  # the layers themselves, or inside the deltas that wrap them
            layers = [unwrap(module) if isinstance(module := getattr(parent, name, None), nn.Module) else None
                      for name in names]
            if (all(type(layer) is PackedLinear and layer.siblings is None for layer in layers)
                    and len({layer.in_features for layer in layers}) == 1
                    and len({layer.bias is None for layer in layers}) == 1):
                FusedSiblings(layers, batch_size)
    for layer in swapped:
        if layer.siblings is None:
            layer._repack()
    return len(swapped)
