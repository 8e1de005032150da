"""A quantized frozen base: the recipe of QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of
Quantized LLMs").

The base model is frozen, so its weights need not stay in full precision: QLoRA stores them in 4-bit
NormalFloat (§3, "4-bit NormalFloat Quantization") and trains LoRA in 16-bit on top,

    Y = X dequant(W_q) + s X A B          (QLoRA eq. 5; W_q quantized and frozen, A and B full precision)

so the gradient flows through the quantized weight into the lower layers' deltas, but no weight update
does. `quantize_model(model, scheme)` replaces every linear layer inside the transformer blocks by a
`QuantizedLinear` holding a weight-only quantized W from a maintained library; embeddings, norms, biases
and the task / LM head stay as they are (QLoRA §3 keeps them in 16-bit too):

- ``int8``: per-output-channel symmetric int8 (torchao `Int8WeightOnlyConfig`): 1 byte per weight + one
  scale per row; the forward runs torchao's int8 weight-only matmul, its backward the same.
- ``int4``: asymmetric int4 in groups of 64 input features (32 where 64 does not divide d_in; torchao's
  CPU tinygemm layout, `Int4OpaqueTensor`, `torch.ops.aten._weight_int4pack_mm_for_cpu`): 4 bits per weight
  + a scale and zero point per group. torchao has no backward for this kernel, so the layer supplies one:
  dL/dx = dL/dy W with W dequantized through the same kernel (QLoRA computes dL/dX the same way, §3 eq. 6).
- ``nf4``: 4-bit NormalFloat in blocks of 64 with double quantization of the block scales (QLoRA §3;
  bitsandbytes `Params4bit`, `matmul_4bit`: CUDA kernels, and a CPU backend (the pinned 0.50.2 runs forward and
  backward on this CPU; with no optional `kernels` package it dequantizes and multiplies in torch).

A layer whose input width the 4-bit group does not divide, or that transformers keeps in fp32 (T5's `wo`),
stays in full precision (`quantization_info` counts them). A quantized base cannot be trained (full,
top_layers) nor have LoRA merged into it; see `check_trainable` and `LoRALinear.merge`.
"""

from __future__ import annotations

import importlib.metadata
import logging
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.core.architectures import in_transformer_block, linear_layers, replace_module
from deltatune.errors import QuantizationError

SCHEMES: tuple[str, ...] = ("int8", "int4", "nf4")
LIBRARY = {"int8": "torchao", "int4": "torchao", "nf4": "bitsandbytes"}
INT4_GROUP_SIZES = (64, 32)  # torchao's int4 CPU kernel takes groups of 32..256 input features
NF4_BLOCK_SIZE = 64  # QLoRA §3: block size 64 for the weights (256 for the second-level constants)
FINGERPRINT_SAMPLE = 64  # io.weights_fingerprint reads this many values of each weight


class QuantizedLinear(nn.Linear):
    """A frozen linear layer y = x dequant(W_q)^T + b with W_q stored by a quantization library.

    It is an `nn.Linear` (LoRA wraps it, BitFit hooks it, `in_features`/`out_features` hold) whose `weight`
    is the library's quantized tensor: torchao's `Int8Tensor` / `Int4OpaqueTensor` (logical shape
    (d_out, d_in)) or bitsandbytes' packed `Params4bit`. The bias stays in full precision. `compute_dtype`
    is the original weight's dtype: inputs are cast to it and deltas built beside it use it.
    """

    def __init__(self, linear: nn.Module, scheme: str, group_size: int | None = None):
        nn.Module.__init__(self)
        weight = linear.weight.detach()
        # the first values of the full-precision W as stored: the base's weights fingerprint stays that of the
        # unquantized checkpoint, so a delta trained on one precision is recognised on the other
        sample = weight.reshape(-1)[:FINGERPRINT_SAMPLE].clone()
        self.conv1d = not isinstance(linear, nn.Linear)  # transformers' Conv1D (GPT-2) stores W as (d_in, d_out)
        if self.conv1d:
            weight = weight.T.contiguous()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.group_size = group_size
        self.compute_dtype = weight.dtype
        self.register_buffer("weight_sample", sample, persistent=False)
        # torchao's CPU int4 kernel is ~60x slower on fp32 activations than on bf16 (a 1536x384 weight, 2,048 rows:
        # 3.9 s vs 0.065 s; MiniLM training step 92x fp32's): int4 layers quantize from bf16 and multiply in bf16,
        # as QLoRA computes in bf16 (§3); the output returns in the compute dtype
        self.kernel_dtype = torch.bfloat16 if scheme == "int4" else weight.dtype
        quantized = _quantize_weight(weight.to(self.kernel_dtype), scheme, group_size)  # bnb: a Parameter already
        self.weight = quantized if isinstance(quantized, nn.Parameter) else nn.Parameter(quantized, requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if self.scheme == "int8":
            return F.linear(x, self.weight, self.bias)  # torchao's int8 weight-only matmul (and its backward)
        if self.scheme == "int4":
            out = _Int4Matmul.apply(x, self)
        else:
            import bitsandbytes as bnb

            out = bnb.matmul_4bit(x, self.weight.t(), quant_state=self.weight.quant_state)
        return out if self.bias is None else out + self.bias

    def dequantize(self) -> torch.Tensor:
        """dequant(W_q), (d_out, d_in) in `compute_dtype`: the weight this layer multiplies by."""
        with torch.no_grad():
            if self.scheme == "int8":
                return self.weight.dequantize().to(self.compute_dtype)
            if self.scheme == "int4":  # the kernel on the identity: I dequant(W)^T = dequant(W)^T
                eye = torch.eye(self.in_features, dtype=self.kernel_dtype, device=self.weight_sample.device)
                weight = F.linear(eye, self.weight).T  # (d_in, d_out) -> (d_out, d_in), exact: bf16 holds dequant(W)
                return weight.to(self.compute_dtype).contiguous()
            import bitsandbytes.functional as bnbf

            return bnbf.dequantize_4bit(self.weight, self.weight.quant_state).to(self.compute_dtype)

    def storage_bytes(self) -> int:
        """Bytes the quantized weight occupies: packed values plus scales / zero points (bias excluded)."""
        if self.scheme == "nf4":  # + the block scales (8-bit, double quantization), not the shared code tables
            state = self.weight.quant_state
            total = self.weight.nbytes + state.absmax.nbytes
            if state.nested:
                total += state.state2.absmax.nbytes + state.offset.nbytes
            return total
        return sum(getattr(self.weight, name).nbytes for name in self.weight.tensor_data_names)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme}{group}")


class _Int4Matmul(torch.autograd.Function):
    """y = x dequant(W)^T through torchao's int4 kernel; dL/dx = dL/dy dequant(W) (W frozen: no dL/dW)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        with torch.no_grad():  # the kernel in bf16 (QuantizedLinear.kernel_dtype), the result in x's dtype
            return F.linear(x.to(layer.kernel_dtype), layer.weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.layer.dequantize()  # (d_out, d_in), rebuilt per backward: never kept beside W_q
        return grad_output.to(weight.dtype) @ weight, None  # (..., d_out) @ (d_out, d_in) -> (..., d_in)


def _quantize_weight(weight: torch.Tensor, scheme: str, group_size: int | None) -> torch.Tensor:
    """The library's quantized form of `weight` (d_out, d_in)."""
    with _quiet_imports():
        if scheme == "int8":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
            holder.weight = nn.Parameter(weight.clone(), requires_grad=False)
            quantize_(holder, Int8WeightOnlyConfig())
            return holder.weight.data
        if scheme == "int4":
            from torchao.prototype.quantization.int4 import Int4OpaqueTensor

            return Int4OpaqueTensor.from_hp(weight, [1, group_size])
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=NF4_BLOCK_SIZE,
                                 compress_statistics=True, quant_type="nf4").to(weight.device)


@contextmanager
def _quiet_imports():
    """torchao logs a warning for each CUDA-only extension it cannot load on a CPU build, and bitsandbytes one
    for an optional CPU kernel package: neither is an error for the layers here."""
    loggers = [logging.getLogger(name) for name in ("torchao", "bitsandbytes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def check_scheme(scheme: str | None) -> str | None:
    """`scheme` if it is None or one of SCHEMES, and its library importable; else a QuantizationError."""
    if scheme is None or scheme in ("none", "fp32"):
        return None
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown quantization {scheme!r}; choose one of {', '.join(SCHEMES)} "
                                f"(or leave --quantize out for a full-precision base)")
    library = LIBRARY[scheme]
    try:
        importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        raise QuantizationError(f"--quantize {scheme} needs the package {library!r}, which is not installed: "
                                f"pip install -r requirements.txt (it pins the version deltatune is tested with)"
                                ) from None
    return scheme


def int4_group_size(in_features: int) -> int | None:
    """The int4 group size for a layer with `in_features` inputs (None: no group size divides it)."""
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


def quantize_model(model: nn.Module, scheme: str | None) -> nn.Module:
    """Replace every linear layer inside the transformer blocks of `model` (in place) by a `QuantizedLinear`
    of `scheme` (int8, int4, nf4; None: leave the model as it is) and return it. Embeddings, norms, biases
    and heads outside the blocks keep their precision. A model that already carries deltas is refused: quantize
    the plain base, then attach."""
    scheme = check_scheme(scheme)
    if scheme is None:
        return model
    from deltatune.core.component import DeltaComponent

    if any(isinstance(module, DeltaComponent) for module in model.modules()):
        raise QuantizationError("this model already carries deltas; quantize the plain base model, then attach "
                                "or load deltas onto it")
    if any(isinstance(module, QuantizedLinear) for module in model.modules()):
        raise QuantizationError("this model is already quantized; load a fresh base to quantize it another way")
    kept = 0
    # modules transformers keeps in fp32 whatever the load dtype (T5's `wo`: its forward casts the input to the
    # weight's dtype, which a packed 4-bit weight would turn into bytes); transformers' own bitsandbytes path
    # leaves them unquantized too
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, layer in linear_layers(model).items():
        if not in_transformer_block(name) or isinstance(layer, QuantizedLinear):
            continue
        if name.rpartition(".")[2] in keep:
            kept += 1
            continue
        group = None
        if scheme == "int4":
            group = int4_group_size(layer.weight.shape[1 if isinstance(layer, nn.Linear) else 0])
            if group is None:
                kept += 1
                continue
        replace_module(model, name, QuantizedLinear(layer, scheme, group))
    info = quantization_info(model)
    if info is None:
        raise QuantizationError(f"no linear layer inside the transformer blocks of this "
                                f"{getattr(getattr(model, 'config', None), 'model_type', 'model')} could be "
                                f"quantized ({kept} kept in full precision: kept in fp32 by the model, or input "
                                f"widths not multiples of 32)")
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}


def quantization_info(model: nn.Module) -> dict[str, Any] | None:
    """What delta.json records about a quantized base (None for a full-precision one): the scheme, the library
    and its version, how many linear layers are quantized and how many of the blocks' linear layers are not."""
    layers = quantized_layers(model)
    if not layers:
        return None
    scheme = next(iter(layers.values())).scheme
    library = LIBRARY[scheme]
    block_linears = [name for name in linear_layers(model) if in_transformer_block(name)]
    info = {"scheme": scheme, "library": f"{library} {importlib.metadata.version(library)}",
            "layers": len(layers), "full_precision_layers": len(block_linears) - len(layers)}
    if scheme == "int4":
        info["group_sizes"] = sorted({layer.group_size for layer in layers.values()})
    if scheme == "nf4":
        info["block_size"] = NF4_BLOCK_SIZE
    return info


def logical_parameters(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.Tensor]]:
    """{name: (shape, values)} of every parameter as the unquantized model would have it: a quantized weight
    reports its (d_out, d_in) shape (Conv1D's (d_in, d_out)) and its sample of full-precision values. The base
    fingerprints read this, so that a delta fits the same checkpoint at any precision."""
    layers = quantized_layers(model)
    result = {}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        layer = layers.get(owner)
        if layer is not None and leaf == "weight":
            shape = (layer.out_features, layer.in_features)
            result[name] = (shape[::-1] if layer.conv1d else shape, layer.weight_sample)
        else:
            result[name] = (tuple(param.shape), param)
    return result


def check_trainable(model: nn.Module, method: str, updates_base: bool) -> None:
    """Refuse a method that trains base weights on a quantized base."""
    info = quantization_info(model)
    if info is not None and updates_base:
        raise QuantizationError(
            f"{method} trains the base model's own weights, but this base is quantized ({info['scheme']}): its "
            f"linear weights are stored as {info['scheme']} codes, which have no gradient and cannot take small "
            f"updates (QLoRA trains only deltas beside the frozen quantized weights). Use lora, bitfit, adapter, "
            f"prompt or prefix on a quantized base, or load the base without --quantize for {method}."
        )

