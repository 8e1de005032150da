"""What `deltatune serve` accepts (`ServeConfig`, from which the CLI's options are generated) and where deltas may
be loaded from over HTTP; read by the app (`app.py`), both engines (`classify.py`, `decode_loop.py`) and the model's
thread (`worker.py`). It imports nothing of the server's other modules; its refusals are `deltatune.errors` types,
answered by `http_errors.py`'s table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from deltatune.core.quantize import SCHEMES
from deltatune.errors import DeltaTuneError, LoadingRefused

KINDS = ("auto", "classification", "generation")
PRECISIONS = ("auto", "fp32", "bf16")
API_KEY_VARIABLE = "DELTATUNE_API_KEY"
# Linux's limits (limits.h): a longer name or path makes open() fail with ENAMETOOLONG
NAME_MAX, PATH_MAX = 255, 4096


@dataclass
class ServeConfig:
    """What the server serves, how it batches and how much it accepts."""

    kind: str = field(default="auto", metadata={
        "help": "classification (/v1/predict) or generation (OpenAI-compatible /v1/completions and "
                "/v1/chat/completions); auto: from the model's architecture (a causal LM generates)",
        "choices": list(KINDS)})
    max_batch_size: int = field(default=32, metadata={
        "help": "inputs in one forward pass; generation: sequences decoding together (at most)"})
    decode_loops: int = field(default=1, metadata={
        "help": "generation: decode loops on one model, each on its own thread with its share of --max-batch-size "
                "rows and of the intra-op threads (0, the command's default: two in fp32 on a CPU with two "
                "threads or more, one in bf16 or on a GPU); fp32 on 2 cores: two one-thread loops served mixed "
                "deltas at 1.15-1.3x the tokens/s of one two-thread loop; bf16 on a 2-core Xeon with AMX: one loop "
                "served the base at 1.29-1.34x the tokens/s of two (its products are bound by reading the weights, "
                "once per loop and step)",
        "cli_default": 0})
    max_wait_ms: float = field(default=5.0, metadata={"help": "how long the oldest request waits for company"})
    queue_size: int = field(default=256, metadata={
        "help": "requests waiting at most; more get 429 with Retry-After"})
    max_inputs: int = field(default=64, metadata={"help": "inputs in one request at most (more: 422)"})
    max_length: int = field(default=128, metadata={"help": "tokens per input (longer ones are cut)"})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "generation: prompt tokens at most (more: 400)"})
    max_tokens: int = field(default=512, metadata={"help": "generation: the max_tokens a request may ask for"})
    max_n: int = field(default=8, metadata={"help": "generation: choices (n) per request at most"})
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "larger request bodies get 413"})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_VARIABLE}; "
                f"the variable keeps the key out of the process list)"})
    allow_loading: bool = field(default=False, metadata={
        "help": "allow loading (POST /v1/tasks) and removing deltas over HTTP, from folders under --delta-root only"})
    delta_root: str | None = field(default=None, metadata={"help": "the folder deltas may be loaded from over HTTP"})
    max_loaded_deltas: int = field(default=0, metadata={
        "help": "deltas kept loaded at most (0: no bound): loading one more unloads the least recently used delta "
                "no request is using (never one given with --delta), which a later request for it loads again from "
                "its folder"})
    trust_pickle: bool = field(default=False, metadata={"help": "also load deltas stored as pickles"})
    prefill_tokens: int = field(default=512, metadata={
        "help": "generation: prompt tokens prefilled in one pass at most (summed over the requests prefilled "
                "together); a longer prompt is prefilled in chunks with decode steps of the running rows between "
                "them"})
    # the library default is fp32 (the same numbers on every machine); the command line takes the fastest
    # precision the hardware has, as `deltatune train` does
    precision: str = field(default="fp32", metadata={
        "help": "the served model's weights and activations: auto (the command's default): bf16 where the CPU/GPU "
                "has native bf16 math (AVX512-BF16 or AMX; a bf16-capable GPU), else fp32",
        "choices": list(PRECISIONS), "cli_default": "auto"})
    packed_head: bool = field(default=False, metadata={
        "help": "generation in fp32 on a CPU: the LM head's weight prepacked for oneDNN once, as vLLM's CPU backend "
                "does (serving/packed_linear.py: the head alone ~2x faster at 16 rows, logits equal to ~1e-6; off by "
                "default: the whole server measured 0.84-0.86x the tokens/s with it, docs/results/vs_vllm.md)"})
    packed_linears: bool = field(default=False, metadata={
        "help": "generation on a CPU, fp32 or bf16 (where the CPU has native bf16 math): every linear layer's weight "
                "(and the LM head's) prepacked for oneDNN once, as vLLM's CPU backend does "
                "(serving/packed_linear.py); on for the command where the packed copy takes at most half the memory "
                "available (it is a second copy of the weights); it served 1.05-1.25x the tokens/s in fp32 on a "
                "2-core AVX2 CPU, 1.37-1.49x in bf16 on a 2-core Xeon with AMX (docs/results/vs_vllm.md)",
        "cli_default": True})
    written_step: bool = field(default=True, metadata={
        "help": "generation: Llama-style decoders (SmolLM2, Llama 2/3) decode with their step written out "
                "(serving/llama_step.py: the same operators as the model's forward, bit-identical logits, without its "
                "per-call machinery) while every delta loaded wraps or hooks only its projections and norms; "
                "--no-written-step runs the model's own forward"})
    prefill_in_step: bool = field(default=True, metadata={
        "help": "generation, where the written-out step runs: a joining request's prompt (at most --prefill-tokens "
                "tokens, one choice) is prefilled inside the next decode step, its tokens beside the running rows' in "
                "every product, instead of in a pass of its own (serving/llama_step.py); --no-prefill-in-step "
                "prefills every prompt in passes of its own"})
    fused_kernels: bool = field(default=False, metadata={
        "help": "generation on an x86-64 CPU with AVX-512, where the written-out step runs: its norms, rotary "
                "embeddings, cache writes, decode attention and MLP activation run as fused C kernels "
                "(serving/cpu_kernels.c, built once with the machine's C compiler and cached) instead of ~1,500 "
                "PyTorch operators a step; logits within fp32 / bf16 rounding of the forward's, not bit-identical "
                "(attention in fp32, a norm's mean summed in another order; fp32 served the same greedy text as "
                "vLLM's fp32 128/128); on for the command: one 16-row step 1.35x faster in bf16, 1.19x in fp32 "
                "(benchmarks/written_step.py); where it cannot be built, the operators run (GET /stats: "
                "fused_steps)",
        "cli_default": True})
    quantize: str | None = field(default=None, metadata={
        "help": "the base's block linear weights quantized: int8 | int4 | nf4 (deltas trained at any precision "
                "load onto it)", "choices": list(SCHEMES)})

    def __post_init__(self) -> None:
        counts = (self.max_batch_size, self.queue_size, self.max_inputs, self.max_prompt_tokens, self.max_tokens,
                  self.max_n, self.max_body_bytes, self.prefill_tokens)
        if min(counts) < 1 or self.max_wait_ms < 0 or self.max_loaded_deltas < 0 or self.decode_loops < 0:
            raise DeltaTuneError(f"serve settings must be positive: {self}")
        if self.precision not in PRECISIONS:
            raise DeltaTuneError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.kind not in KINDS:
            raise DeltaTuneError(f"unknown serve kind {self.kind!r}; choose one of {list(KINDS)}")
        if self.allow_loading and not self.delta_root:
            raise DeltaTuneError("--allow-loading needs --delta-root DIR: deltas are loaded over HTTP only from "
                                 "folders under it")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_VARIABLE) or None


def shown_path(path: str, limit: int = 80) -> str:
    """`path` as an error message or a log line shows it: repr'd, its middle cut when it is long (a client may send
    a path of any length; the answer and the log should not carry it whole)."""
    if len(path) <= limit:
        return repr(path)
    return f"{path[:limit // 2]!r}...{path[-limit // 2:]!r} ({len(path):,} characters)"


def delta_under_root(root: str | Path, path: str) -> Path:
    """The delta folder `path` (relative to `root`) if it lies inside `root` once every symlink is followed; a path
    with `..`, an absolute path elsewhere, or a symlink pointing out of the root is refused, and so is a path the
    file system cannot take (a NUL byte; a name over NAME_MAX or a path over PATH_MAX bytes), before it is used."""
    root_path = Path(root).resolve()
    if "\x00" in path:
        raise LoadingRefused(f"delta path {shown_path(path)} contains a NUL byte; give a folder under the delta root")
    try:
        longest_name = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
        too_long = len(os.fsencode(path)) + len(os.fsencode(str(root_path))) >= PATH_MAX or longest_name > NAME_MAX
    except UnicodeError:  # a lone surrogate (JSON's "\\ud800") has no bytes on disk
        raise LoadingRefused(f"delta path {shown_path(path)} is not valid text (a lone surrogate); give a folder under "
                             f"the delta root") from None
    if too_long:
        raise LoadingRefused(f"delta path {shown_path(path)} is too long for the file system (a name over {NAME_MAX} "
                             f"or a path over {PATH_MAX} bytes); give a folder under the delta root")
    if ".." in Path(path).parts:
        raise LoadingRefused(f"delta path {shown_path(path)} contains '..'; give a folder under the delta root")
    candidate = (root_path / path).resolve()
    if not candidate.is_relative_to(root_path):
        raise LoadingRefused(f"delta path {shown_path(path)} lies outside the delta root (after following symlinks); "
                             f"deltas are loaded only from folders under --delta-root")
    return candidate
