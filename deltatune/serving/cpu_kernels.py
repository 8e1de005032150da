"""The decode step's small operators fused in C (`cpu_kernels.c`), for x86-64 CPUs with AVX-512.

A Llama decode step of SmolLM2-135M on 16 rows runs ~1,500 operators besides its ~120 matrix products: norms, rotary
embeddings, cache writes, attention, the gated MLP's activation. Each costs a few microseconds of dispatch for a few
kilobytes of work, and SDPA's flash kernel spends ~100-250 us on one decode token's attention over ~70 positions (its
blocks are sized for long sequences). Timed in one 16-row bf16 step on a 2-core Xeon (two threads): products 16-22
ms, SDPA 6-8 ms, everything else 13 ms. vLLM's CPU backend runs these as its own C++ kernels
(`csrc/cpu/`: rms_norm, rotary embedding, its `cpu_attention`) for the same reason.

`load()` compiles `cpu_kernels.c` once per machine with the C compiler it finds (`$CC`, else `cc`), `-O3
-march=native -fopenmp`, into `~/.cache/deltatune/kernels/` (`$DELTATUNE_KERNEL_CACHE`), named by a hash of the
source, the flags, the compiler and the CPU's flags; the library is written under a temporary name and renamed, so a
half-written one is never loaded. Where there is no AVX-512, no compiler or the build fails, `load()` returns None
(the reason in `unavailable_reason()`) and the step runs the eager operators. The library links the process's
libgomp (PyTorch's), so its OpenMP threads are PyTorch's intra-op threads.

What the kernels change: rotary embeddings, cache writes, the residual adds and the MLP's product are rounded exactly as
the eager operators round them (products and sums of two bf16 values are exact in fp32); the RMSNorm's mean and
silu's exp are summed / approximated in another order (fp32 results within a few ulp); attention computes its scores
and softmax in fp32 and its output in one rounding, more accurately than SDPA's bf16 path (max error against a
float64 reference 1.9e-3 vs SDPA's 2.5e-3 in bf16, 3.1e-7 vs 5.5e-7 in fp32). So the step's logits are no longer
bit-identical to the model's forward: in fp32 SmolLM2-135M's differ by up to ~6e-5 after its 30 layers (the same
greedy text as vLLM's fp32 on 128 of 128 E2E prompts), in bf16 by bf16's rounding (tests/test_cpu_kernels.py,
benchmarks/written_step.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
_reason: list[str] = []


def unavailable_reason() -> str | None:
    """Why `load()` returned None (None while it has not, or where it loaded)."""
    return _reason[0] if _reason else None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cache_dir() -> Path:
    return Path(os.environ.get("DELTATUNE_KERNEL_CACHE") or Path.home() / ".cache" / "deltatune" / "kernels")


def _build(compiler: str, flags: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, flags]).encode()).hexdigest()[:16]
    library = _cache_dir() / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # no fallback to a shared temporary folder: a library found there could be anyone's
        raise RuntimeError(f"cannot make the kernel cache folder {library.parent} ({error}); set "
                           f"DELTATUNE_KERNEL_CACHE to a folder of your own") from error
    with tempfile.TemporaryDirectory(dir=library.parent) as scratch:  # built aside, then renamed: never half-written
        built = Path(scratch) / library.name
        result = subprocess.run([compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)
    return library


@functools.cache
def load() -> CpuKernels | None:
    """The compiled kernels, or None where they cannot run here (`unavailable_reason()` says why)."""
    _reason.clear()
    flags = _cpu_flags().split()
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if platform.machine() not in ("x86_64", "AMD64") or "avx512f" not in flags or "avx512bw" not in flags:
        _reason.append("the fused decode kernels need an x86-64 CPU with AVX-512 (F and BW)")
    elif compiler is None:
        _reason.append(f"no C compiler ({os.environ.get('CC', 'cc')}) to build the fused decode kernels")
    else:
        try:
            return CpuKernels(ctypes.CDLL(str(_build(compiler, " ".join(flags)))))
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _reason.append(f"the fused decode kernels did not build: {error}")
    logger.info("%s: the decode step runs PyTorch's operators", _reason[0])
    return None


_LONG3 = ctypes.c_long * 3


def _attention_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     cache_shape: tuple[int, ...]) -> bool:
    """Whether the attention kernels take these tensors: query (tokens, heads, dim), key and value (tokens, kv heads,
    dim), cos and sin (tokens, dim), the caches `cache_shape`, all of one dtype, each contiguous in its last
    dimension, the two caches (and cos and sin) laid out alike."""
    tokens, _, dim = query.shape
    return (key.shape == (tokens, cache_shape[-3], dim) and value.shape == key.shape
            and key_cache.shape == cache_shape and value_cache.shape == cache_shape and cos.shape == (tokens, dim)
            and sin.shape == cos.shape and key_cache.stride() == value_cache.stride() and cos.stride() == sin.stride()
            and all(tensor.dtype == query.dtype and tensor.stride(-1) == 1
                    for tensor in (query, key, value, cos, sin, key_cache, value_cache)))


class CpuKernels:
    """The library's three functions on torch tensors (fp32 or bf16, on the CPU). Each returns None where the
    kernel does not take the shapes (the caller runs the eager operators)."""

    def __init__(self, library: ctypes.CDLL):
        pointer, long, integer, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        self._add_rms_norm = library.add_rms_norm
        self._add_rms_norm.argtypes = [integer, pointer, pointer, pointer, pointer, pointer, integer, integer, real]
        self._rope_attend = library.rope_attend
        self._rope_attend.argtypes = [integer, pointer, _LONG3, pointer, _LONG3, pointer, _LONG3, pointer, pointer,
                                      long, pointer, pointer, _LONG3, pointer, long, pointer, integer, integer,
                                      integer, integer, integer, real]
        self._prefill_attend = library.prefill_attend
        self._prefill_attend.argtypes = [integer, pointer, _LONG3, pointer, _LONG3, pointer, _LONG3, pointer,
                                         pointer, long, pointer, pointer, _LONG3, pointer, integer, integer, integer,
                                         integer, real]
        self._silu_mul = library.silu_mul
        self._silu_mul.argtypes = [integer, pointer, long, pointer, long, pointer, integer, integer]
        for function in (self._add_rms_norm, self._rope_attend, self._prefill_attend, self._silu_mul):
            function.restype = integer
        self._stride_arrays: dict[tuple[int, ...], ctypes.Array] = {}

    @staticmethod
    def takes(*tensors: torch.Tensor) -> bool:
        """Whether the kernels take these tensors: one dtype of fp32 / bf16, on the CPU, no gradient to record."""
        dtype = tensors[0].dtype
        return (dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
                and all(tensor.dtype == dtype and tensor.device.type == "cpu" for tensor in tensors))

    def _strides(self, values: tuple[int, ...]) -> ctypes.Array:
        """A ctypes array of three strides, made once per distinct value (a step passes the same ones every layer)."""
        array = self._stride_arrays.get(values)
        if array is None:
            array = self._stride_arrays[values] = _LONG3(*values)
        return array

    def _with_strides(self, *tensors: torch.Tensor) -> list:
        """Each (tokens, heads, dim) tensor as the kernels take it: its data, its (token, head, 1) strides."""
        return [argument for tensor in tensors
                for argument in (tensor.data_ptr(), self._strides((*tensor.stride()[:2], 1)))]

    def add_rms_norm(self, residual: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(residual + delta, weight * rms_norm(residual + delta)) as transformers' LlamaRMSNorm computes the norm;
        delta None: (residual, its norm). Tensors (..., hidden) of one dtype, contiguous."""
        dtype = residual.dtype
        if (weight.dtype != dtype or weight.shape != residual.shape[-1:] or not residual.is_contiguous()
                or not weight.is_contiguous() or (delta is not None and (
                    delta.dtype != dtype or delta.shape != residual.shape or not delta.is_contiguous()))):
            return None
        total = torch.empty_like(residual) if delta is not None else residual
        normed = torch.empty_like(residual)
        hidden = residual.shape[-1]
        if self._add_rms_norm(dtype == torch.bfloat16, residual.data_ptr(),
                              None if delta is None else delta.data_ptr(), total.data_ptr(), weight.data_ptr(),
                              normed.data_ptr(), residual.numel() // hidden, hidden, eps) != 0:
            return None
        return total, normed

    def rope_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> torch.Tensor | None:
        """One new token per row: query (rows, heads, dim), key and value (rows, kv heads, dim), cos and sin (rows,
        dim), all of one dtype; the caches' windows (rows, kv heads, length, dim) whose last column the rotated key and
        the value are written into; mask additive fp32 (rows, length) or None. Returns the attention's output (rows,
        heads * dim)."""
        rows, heads, dim = query.shape
        kv_heads, length = key_cache.shape[1], key_cache.shape[2]
        if (not _attention_takes(query, key, value, cos, sin, key_cache, value_cache, (rows, kv_heads, length, dim))
                or (mask is not None and (mask.dtype != torch.float32 or mask.shape != (rows, length)
                                          or mask.stride(-1) != 1))):
            return None
        out = query.new_empty(rows, heads * dim)
        if self._rope_attend(query.dtype == torch.bfloat16, *self._with_strides(query, key, value), cos.data_ptr(),
                             sin.data_ptr(), cos.stride(0), key_cache.data_ptr(), value_cache.data_ptr(),
                             self._strides(key_cache.stride()[:3]), None if mask is None else mask.data_ptr(),
                             0 if mask is None else mask.stride(0),
                             out.data_ptr(), rows, heads, kv_heads, length, dim, scale) != 0:
            return None
        return out

    def prefill_attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, key_slot: torch.Tensor, value_slot: torch.Tensor,
                       scale: float) -> torch.Tensor | None:
        """One prompt's tokens: query (tokens, heads, dim), key and value (tokens, kv heads, dim), cos and sin (tokens,
        dim), all of one dtype; its cache slot's columns (kv heads, tokens, dim), which the rotated keys and the values
        are written into. Returns the causal attention's output (tokens, heads * dim)."""
        tokens, heads, dim = query.shape
        if not _attention_takes(query, key, value, cos, sin, key_slot, value_slot, (key.shape[1], tokens, dim)):
            return None
        out = query.new_empty(tokens, heads * dim)
        if self._prefill_attend(query.dtype == torch.bfloat16, *self._with_strides(query, key, value),
                                cos.data_ptr(), sin.data_ptr(), cos.stride(0), key_slot.data_ptr(),
                                value_slot.data_ptr(), self._strides((0, *key_slot.stride()[:2])),
                                out.data_ptr(), tokens, heads, key.shape[1], dim, scale) != 0:
            return None
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up, rounded as the eager operators round; gate and up (..., width) of one dtype, rows apart by
        any stride (the columns of one fused product)."""
        width = gate.shape[-1]
        if gate.shape != up.shape or gate.dtype != up.dtype:
            return None
        gate2, up2 = gate.reshape(-1, width), up.reshape(-1, width)  # views where the rows are evenly spaced
        if gate2.stride(-1) != 1 or up2.stride(-1) != 1:
            return None
        out = gate.new_empty(gate.shape)
        if self._silu_mul(gate.dtype == torch.bfloat16, gate2.data_ptr(), gate2.stride(0), up2.data_ptr(),
                          up2.stride(0), out.data_ptr(), gate2.shape[0], width) != 0:
            return None
        return out
