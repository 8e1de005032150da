"""Every per-architecture table, and finding the modules a method acts on.

Every method asks the same questions of a model — which linear layers are W_q and W_v, where the adapters
go, how positions are numbered, which modules form the repeated transformer blocks, which module is the
task head — and this file answers them, so that the answer for a new architecture is added in one place
(the tables keyed by `config.model_type`: DEFAULT_LORA_TARGETS, ADAPTER_SITES, ROBERTA_LIKE,
CONV1D_MODEL_TYPES, ENCODER_ONLY_TYPES).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from deltatune.errors import TargetError
from deltatune.methods.common import DeltaComponent

try:  # GPT-2's fused projections are Conv1D (a Linear with a transposed weight)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

LINEAR_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)

# model_type -> default LoRA targets (W_q and W_v). A target "name[i/n]" means: slice i of n equal
# output slices of a fused projection (GPT-2's c_attn computes [q | k | v] in one Conv1D).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "camembert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt2": ["c_attn[0/3]", "c_attn[2/3]"],
}

# Names of task heads trained along with every method (the `...ForSequenceClassification` heads).
DEFAULT_HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs")

# model_type -> (after attention, after FFN), for adapters (Houlsby et al. 2019 §2.1): regexes for the
# module whose output is the sub-layer's output just before its residual add. BERT-like models and GPT-2
# apply dropout there, and Houlsby's code puts the adapter after that dropout; Llama has no dropout, so its
# adapters follow o_proj and down_proj. Cross-attention (T5's decoder layer.1) gets no adapter: two adapters
# per layer, as the paper's encoder-only count (the `adapters` library's default too).
_BERT = (r"(^|\.)attention\.output\.dropout$", r"(^|\.)layer\.\d+\.output\.dropout$")
_LLAMA = (r"(^|\.)self_attn\.o_proj$", r"(^|\.)mlp\.down_proj$")
_T5 = (r"(^|\.)block\.\d+\.layer\.0\.dropout$",  # T5LayerSelfAttention.dropout (before its residual add)
       r"(^|\.)(encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)\.dropout$")  # T5LayerFF.dropout
ADAPTER_SITES: dict[str, tuple[str, str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], _BERT),
    "gpt2": (r"(^|\.)attn\.resid_dropout$", r"(^|\.)mlp\.dropout$"),  # GPT-2 drops out after c_proj
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"], _LLAMA),
    **dict.fromkeys(["t5", "mt5"], _T5),
}

# Position ids numbered from padding_idx + 1 (RoBERTa's embeddings): such a model numbers fewer tokens than
# its max_position_embeddings.
ROBERTA_LIKE = frozenset({"roberta", "xlm-roberta", "camembert"})

# Prefix tuning: model_type -> how the prefixes reach attention. "cache": the model's own key/value cache,
# which BERT/RoBERTa hand to every self-attention and the decoders (GPT-2, Llama) read before the input;
# "encoder-decoder" (T5): the decoder's cache, plus hooks on the encoder's self-attention (its stack drops
# caches). Other model types are refused by name.
PREFIX_ARCHITECTURES: dict[str, str] = {"bert": "cache", "roberta": "cache", "gpt2": "cache", "llama": "cache",
                                        "t5": "encoder-decoder"}

# Weights stored (d_in, d_out) in transformers' Conv1D: peft's `fan_in_fan_out=True`.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})

# Encoder-only families: transformers gives them an LM head class, but they were not trained to predict the
# next token, so "causal-lm" on them (zero-/few-shot prompting, generation) would give noise.
ENCODER_ONLY_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "camembert",
                                "deberta", "deberta-v2", "mpnet", "modernbert"})

# Transformer blocks live in a ModuleList: BERT `encoder.layer.N`, GPT-2 `h.N`, Llama `layers.N`,
# T5 `block.N`.
_BLOCK_PATTERN = re.compile(r"(^|\.)(layer|layers|h|block|blocks)\.\d+(\.|$)")

# The modules between the last block and the task head that top-k fine-tuning trains with the top blocks:
# the final norm of pre-LN models (GPT-2 `ln_f`, Llama `norm`, T5's decoder `final_layer_norm`) and BERT's
# pooler. Module-name suffixes, matched outside the blocks.
FINAL_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "electra"], ["pooler"]),
    **dict.fromkeys(["roberta", "xlm-roberta", "camembert", "distilbert"], []),  # post-LN: no final norm
    "gpt2": ["ln_f"],
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"], ["model.norm"]),
    **dict.fromkeys(["t5", "mt5"], ["decoder.final_layer_norm"]),
}
_BLOCK_LIST = re.compile(r"(^|\.)(layer|layers|h|block|blocks)$")

_SLICE_PATTERN = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)/(?P<parts>\d+)\]$")


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def in_transformer_block(name: str) -> bool:
    """True for a module or parameter name inside one of the repeated transformer blocks."""
    return bool(_BLOCK_PATTERN.search(name))


def block_index(name: str) -> int | None:
    """The block number in a module or parameter name (`transformer.h.3.attn` -> 3), None outside blocks."""
    match = _BLOCK_PATTERN.search(name)
    return int(name[match.end(2) + 1 :].split(".")[0]) if match else None


def block_lists(model: nn.Module) -> dict[str, nn.ModuleList]:
    """{name: ModuleList} of the stacks of transformer blocks, bottom of the model first (T5: encoder, then
    decoder); lists inside a block (T5's `block.N.layer`) are parts of a block, not stacks."""
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and _BLOCK_LIST.search(name) and not in_transformer_block(name)
        and "base_layer" not in name.split(".")
    }


def top_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack whose output feeds the head: the only one, or the decoder's of an encoder-decoder."""
    stacks = block_lists(model)
    if not stacks:
        raise TargetError(f"no stack of transformer blocks found in this {model_type(model)} model (looked for a "
                          f"ModuleList named layer/layers/h/block/blocks)")
    return list(stacks.items())[-1]


def final_modules(model: nn.Module) -> list[str]:
    """Full names of FINAL_MODULES[model_type] present in the model (outside the blocks)."""
    kind = model_type(model)
    if kind not in FINAL_MODULES:
        raise TargetError(f"no final-module table for model type {kind!r}; known: {sorted(FINAL_MODULES)}")
    names = [name for name, _ in model.named_modules() if not in_transformer_block(name)
             and "base_layer" not in name.split(".")]
    return [name for name in names if any(name == s or name.endswith("." + s) for s in FINAL_MODULES[kind])]


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer inside deltatune's wrappers (they keep it as `base_layer`)."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{full name: layer} of every linear (or Conv1D) layer, looking through deltatune's wrappers."""
    modules = dict(model.named_modules())
    components = [n for n, m in modules.items() if isinstance(m, DeltaComponent)]
    return {
        name: unwrap(module)
        for name, module in modules.items()
        if "base_layer" not in name.split(".")
        and not any(name.startswith(c + ".") for c in components)  # not inside another method's layers
        and isinstance(unwrap(module), LINEAR_TYPES)
    }


def linear_layer_names(model: nn.Module) -> list[str]:
    """Full names of every linear (or Conv1D) layer: the candidates shown when a target matches nothing."""
    return list(linear_layers(model))


def head_names(model: nn.Module, heads: Sequence[str] | None | str = "auto") -> list[str]:
    """Full names of the task-head modules to train with the method.

    `"auto"` picks the standard heads of `...ForSequenceClassification` models; `None` or `[]` trains
    no head; a list gives module-name suffixes.
    """
    if heads is None:
        return []
    suffixes = DEFAULT_HEAD_NAMES if heads == "auto" else tuple(heads)
    found = [
        name
        for name, _ in model.named_modules()
        if name and name.split(".")[-1] in suffixes and not in_transformer_block(name)
    ]
    # keep only outermost matches (a head's own sub-modules are part of it)
    outer = [n for n in found if not any(n.startswith(o + ".") for o in found if o != n)]
    if heads != "auto" and not outer:
        top = [name for name, _ in model.named_children()]
        raise TargetError(f"head {list(suffixes)} matches no module; the model's top-level modules are {top}")
    return outer


def parse_target(target: str) -> tuple[str, int | None, int]:
    """`"c_attn[2/3]"` -> ("c_attn", 2, 3); `"query"` -> ("query", None, 1)."""
    match = _SLICE_PATTERN.match(target)
    if not match:
        return target, None, 1
    return match["name"], int(match["index"]), int(match["parts"])


def resolve_lora_targets(
    model: nn.Module, targets: str | Sequence[str] | None
) -> dict[str, list[tuple[int, int]] | None]:
    """Map the user's `targets` to {module name: output slices or None (= the whole output)}.

    `targets` is None (the architecture's W_q and W_v), a list of module-name suffixes (optionally with
    a `[i/n]` slice of a fused projection), or a regex string matched against full module names.
    """
    if targets is None:
        kind = model_type(model)
        if kind not in DEFAULT_LORA_TARGETS:
            raise TargetError(
                f"no default LoRA targets for model type {kind!r}; pass targets=[...] "
                f"(module-name suffixes or a regex). Linear layers in this model: "
                f"{_summarise(linear_layer_names(model))}"
            )
        targets = DEFAULT_LORA_TARGETS[kind]

    modules = linear_layers(model)
    chosen: dict[str, list[tuple[int, int]] | None] = {}
    if isinstance(targets, str):
        pattern = re.compile(targets)
        for name in modules:
            if pattern.fullmatch(name):
                chosen[name] = None
        if not chosen:
            raise TargetError(
                f"target regex {targets!r} matches no linear layer. Candidates: "
                f"{_summarise(modules)}"
            )
        return chosen

    for target in targets:
        base, index, parts = parse_target(target)
        matched = [name for name in modules if name == base or name.endswith("." + base)]
        if not matched:
            raise TargetError(
                f"LoRA target {target!r} matches no linear layer. Candidates: {_summarise(modules)}"
            )
        for name in matched:
            if index is None:
                chosen[name] = None
                continue
            out_features = output_features(modules[name])
            if out_features % parts:
                raise TargetError(f"{name} has {out_features} outputs, not divisible into {parts} slices")
            width = out_features // parts
            slices = chosen.setdefault(name, [])
            if slices is None:
                continue  # whole layer already chosen
            slices.append((index * width, (index + 1) * width))
    for slices in chosen.values():
        if slices:
            slices.sort()
    return chosen


def output_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return module.weight.shape[1]  # Conv1D stores (in, out)


def input_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return module.weight.shape[0]


def _summarise(names: Iterable[str], limit: int = 12) -> str:
    """Short, readable list of candidate names: distinct suffixes first, then a few full names."""
    names = list(names)
    suffixes = sorted({n.split(".")[-1] for n in names})
    examples = names[:limit]
    return f"suffixes {suffixes}; e.g. {examples}" + (" ..." if len(names) > limit else "")
