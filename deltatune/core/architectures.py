"""Every per-architecture table, and finding the modules a method acts on.

Every method asks the same questions of a model — which linear layers are W_q and W_v, where the adapters
go, how positions are numbered, which modules form the repeated transformer blocks, which module is the
task head — and this file answers them, so that the answer for a new architecture is added in one place
(the tables keyed by `config.model_type`: DEFAULT_LORA_TARGETS, IA3_TARGETS, ADAPTER_SITES, ROBERTA_LIKE,
CONV1D_MODEL_TYPES, ENCODER_ONLY_TYPES).

A model type in no table is read from its structure (`discover_*`): the query and value projections by
their names (separate `q_proj`/`query`/`q_lin`/..., or fused `c_attn`/`qkv_proj`/`query_key_value`/`Wqkv`,
whose q and v output rows follow from the config's heads, key/value heads and head size and the fused
layout, FUSED_QKV_LAYOUTS), the adapter sites from the block's sub-layers, the final norm from the modules
after the last block. Tables win where both exist.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch
from torch import nn

from deltatune.core.component import DeltaComponent
from deltatune.errors import TargetError

try:  # GPT-2's fused projections are Conv1D (a Linear with a transposed weight)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency
    Conv1D = ()

Wrapper = TypeVar("Wrapper", bound=nn.Module)
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
    "opt": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "gpt2": ["c_attn[0/3]", "c_attn[2/3]"],
}

# (IA)³ (Liu et al. 2022 §3.3): model_type -> (the layers whose outputs it rescales: keys and values, l_k and
# l_v; the layers whose inputs it rescales: the FFN's second linear layer, whose input is the activation
# γ(W_1 x) that l_ff rescales). Targets as LoRA's: suffixes, `[i/n]` fused slices, or one regex. BERT-like
# models name both the attention's and the FFN's output layer `output.dense`: the regex picks the FFN's.
_BERT_FFN_OUT = r".*\blayer\.\d+\.output\.dense"
IA3_TARGETS: dict[str, tuple[list[str], list[str] | str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], (["key", "value"], _BERT_FFN_OUT)),
    "distilbert": (["k_lin", "v_lin"], ["ffn.lin2"]),
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"],
                    (["k_proj", "v_proj"], ["down_proj"])),
    "opt": (["k_proj", "v_proj"], ["fc2"]),
    **dict.fromkeys(["t5", "mt5"], (["k", "v"], ["wo"])),  # every attention's k, v: self and encoder-decoder
    "gpt2": (["c_attn[1/3]", "c_attn[2/3]"], ["mlp.c_proj"]),  # c_attn computes [q | k | v]
}

# The layers between the last block and a classifier that `...ForSequenceClassification` reads: BERT/ALBERT's
# `pooler` and DeBERTa's (a dense + tanh over the first token) and DistilBERT's `pre_classifier`. They train with
# the task head: RoBERTa's classification head has the same dense + tanh inside `classifier`, trained with every
# method in Hu et al. 2021 (Table 2); frozen, a pooler that was never trained for the task (all-MiniLM-L6-v2's is
# not: it was trained with mean pooling) starves the methods that keep the base frozen (LoRA on CoLA: MCC 0.00 with
# it frozen, 0.18 trained; STS-B: Pearson 0.14 vs 0.82; docs/results/glue_minilm.md).
HEAD_INPUT_NAMES = ("pooler", "pre_classifier")
# Names of task heads trained along with every method (the `...ForSequenceClassification` heads).
DEFAULT_HEAD_NAMES = ("classifier", "score", "classification_head", "qa_outputs", *HEAD_INPUT_NAMES)

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

# Adapter sites of a model type no table names (`discover_adapter_sites`): in each block, the attention
# sub-layer's output is the last linear layer of width d_model inside its self-attention module (BERT-like
# `attention.output.dense`, DistilBERT `out_lin`, MPNet `attn.o`, GPT-NeoX/BLOOM/Falcon `dense`, `o_proj`,
# `out_proj`, ModernBERT `attn.Wo`); the feed-forward's is the last linear layer of width d_model outside it
# (`output.dense`, `lin2`, `fc2`, `dense_4h_to_h`, `fc_out`, `down_proj`, `mlp.Wo`), or the feed-forward module
# itself where its experts are no linear layers (Mixtral's sparse MoE block). Cross-attention gets none.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_CROSS_ATTENTION = re.compile(r"encoder_attn|crossattention|EncDecAttention", re.IGNORECASE)
_FEED_FORWARD_MODULES = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "moe")

# Position ids numbered from padding_idx + 1 (RoBERTa's embeddings, `create_position_ids_from_input_ids`; their
# position embedding has a padding_idx): such a model numbers fewer tokens than its max_position_embeddings, and
# prefix tuning's mixed batches must number each example's tokens that way. Every encoder whose position
# embedding has a padding_idx in transformers 5.24 (tests/test_prefix.py checks the zoo's against its structure).
ROBERTA_LIKE = frozenset({"roberta", "xlm-roberta", "camembert", "data2vec-text", "roberta-prelayernorm",
                          "xlm-roberta-xl", "xmod", "ibert", "longformer", "luke", "mpnet"})

# Models whose hidden states inside the blocks are length-first, (length, batch, d) (XLNet's, as in Transformer-XL):
# a mixed batch's examples are along dim 1 there (TaskState.batch_dim).
LENGTH_FIRST_TYPES = frozenset({"xlnet"})

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
    """Full names of FINAL_MODULES[model_type] present in the model (outside the blocks); for a model type
    the table lacks, the norms that read the last block's output (`discover_final_norms`)."""
    kind = model_type(model)
    if kind not in FINAL_MODULES:
        return discover_final_norms(model)
    names = [name for name, _ in model.named_modules() if not in_transformer_block(name)
             and "base_layer" not in name.split(".")]
    return [name for name in names if any(name == s or name.endswith("." + s) for s in FINAL_MODULES[kind])]


def discover_final_norms(model: nn.Module) -> list[str]:
    """The layer norms outside the blocks whose input is the last block's output (a pre-LN model's final
    norm: GPT-NeoX `final_layer_norm`, Falcon/BLOOM `ln_f`, Mixtral `norm`...), found by one forward pass on a
    dummy input with hooks; none for a post-LN encoder (its blocks end in their own norm)."""
    _, stack = top_blocks(model)
    outside = {name: module for name, module in model.named_modules()
               if is_norm(module) and not in_transformer_block(name) and "base_layer" not in name.split(".")}
    seen: dict[str, object] = {}
    hooks = [stack[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("block", _first_tensor(out)))]
    hooks += [module.register_forward_pre_hook(lambda m, args, name=name: seen.__setitem__(name, _first_tensor(args)))
              for name, module in outside.items()]
    try:
        with torch.no_grad():
            model(**dummy_inputs(model))
    finally:
        for hook in hooks:
            hook.remove()
    block = seen.get("block")
    return [name for name in outside if block is not None and seen.get(name) is block]


def modules_not_returning_width(model: nn.Module, widths: dict[str, int]) -> list[str]:
    """The modules of {name: width} that, in one forward pass on a dummy input, returned something other than a
    tensor whose last dimension is that width: a bias there is not added to the output (a router returning
    (logits, weights, experts), a model whose `bias` is its attention mask). Modules the pass never called
    (experts no dummy token was routed to) are not listed, nor any on a model without values (on the meta device:
    `deltatune params` counts there) or one that a dummy input cannot run."""
    if any(p.is_meta for p in model.parameters()):
        return []
    returned: dict[str, object] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda m, a, out, name=name: returned.setdefault(name, out)) for name in widths]
    try:
        with torch.no_grad():
            model(**dummy_inputs(model))
    except Exception:  # noqa: BLE001 - no forward pass, nothing learnt: every module stays a candidate
        return []
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name, out in returned.items()
            if not (isinstance(out, torch.Tensor) and out.dim() and out.shape[-1] == widths[name])]


def dummy_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """An eight-token input every model accepts (ids 1 and 2 are within any vocabulary; the end token last;
    long enough for Funnel's pooling between blocks)."""
    device = next(model.parameters()).device
    input_ids = torch.tensor([[2] * 7 + [1]], device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _first_tensor(value):
    while isinstance(value, tuple | list) and value:
        value = value[0]
    return value if isinstance(value, torch.Tensor) else None


def is_norm(module: nn.Module) -> bool:
    """LayerNorm / RMSNorm layers with a learned gain (torch's and transformers' own classes)."""
    named = isinstance(module, nn.LayerNorm | nn.RMSNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))
    return named and isinstance(getattr(module, "weight", None), nn.Parameter)


def unwrap(module: nn.Module) -> nn.Module:
    """The plain layer inside deltatune's wrappers (they keep it as `base_layer`)."""
    while hasattr(module, "base_layer") and isinstance(module.base_layer, nn.Module):
        module = module.base_layer
    return module


def replace_module(model: nn.Module, name: str, replacement: nn.Module | None) -> None:
    """Put `replacement` where the submodule with dotted name `name` is (``"encoder.layer.0.attention.self.query"``);
    None removes it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" is the model itself
    if replacement is None:
        delattr(parent, child)
    else:
        setattr(parent, child, replacement)


def wrapped_module(model: nn.Module, name: str, wrapper: type[Wrapper],
                   wrap: Callable[[nn.Module], Wrapper]) -> Wrapper:
    """The submodule `name` as a `wrapper`: `wrap(module)` put in its place the first time, the same wrapper after."""
    module = model.get_submodule(name)
    if not isinstance(module, wrapper):
        module = wrap(module)
        replace_module(model, name, module)
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


# A LoRA target's output rows: None (the whole output), or groups of row ranges, one group per projection it
# adapts (W_q, W_v) and one (A, B) pair per group: [[(0, 32)], [(64, 96)]] are GPT-2's q and v in c_attn;
# GPT-NeoX's per-head layout gives a group of several ranges, one per head.
RowGroups = list[list[tuple[int, int]]]


def resolve_lora_targets(
    model: nn.Module, targets: str | Sequence[str] | None, method: str = "LoRA"
) -> dict[str, RowGroups | None]:
    """Map the user's `targets` to {module name: output row groups or None (= the whole output)}.

    `targets` is None (the architecture's W_q and W_v: DEFAULT_LORA_TARGETS, else found from the model's
    structure, `discover_query_value`), "all-linear" (every linear layer but the task head and the output
    layer, as peft's `target_modules="all-linear"`), a list of module-name suffixes (optionally with a `[i/n]`
    slice of a fused projection), or a regex string matched against full module names.
    """
    if targets is None:
        kind = model_type(model)
        if kind not in DEFAULT_LORA_TARGETS:
            return discover_query_value(model)
        targets = DEFAULT_LORA_TARGETS[kind]
    if targets == "all-linear":
        return dict.fromkeys(block_linear_layers(model))

    modules = linear_layers(model)
    chosen: dict[str, RowGroups | None] = {}
    if isinstance(targets, str):
        pattern = re.compile(targets)
        for name in modules:
            if pattern.fullmatch(name):
                chosen[name] = None
        if not chosen:
            raise TargetError(
                f"{method} target regex {targets!r} matches no linear layer. Candidates: "
                f"{_summarise(modules)}"
            )
        return chosen

    for target in targets:
        base, index, parts = parse_target(target)
        matched = [name for name in modules if name == base or name.endswith("." + base)]
        if not matched:
            raise TargetError(
                f"{method} target {target!r} matches no linear layer. Candidates: {_summarise(modules)}"
            )
        for name in matched:
            if index is None:
                chosen[name] = None
                continue
            out_features = output_features(modules[name])
            if out_features % parts:
                raise TargetError(f"{name} has {out_features} outputs, not divisible into {parts} slices")
            width = out_features // parts
            groups = chosen.setdefault(name, [])
            if groups is None:
                continue  # whole layer already chosen
            groups.append([(index * width, (index + 1) * width)])
    for groups in chosen.values():
        if groups:
            groups.sort()
    return chosen


def block_linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} of every linear layer but the task heads and the output (LM head) layer: what
    `targets="all-linear"` adapts (peft's rule)."""
    heads = head_names(model)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: layer for name, layer in linear_layers(model).items()
            if layer is not output and not any(name == h or name.startswith(h + ".") for h in heads)}


# ---- structural discovery ---------------------------------------------------------------------------------
# Names of separate query, key and value projections across transformers' architectures: BERT/RoBERTa/ALBERT/
# ELECTRA `query`/`key`/`value`, Llama-style, OPT, GPT-J, BART `q_proj`/..., DistilBERT `q_lin`/..., DeBERTa-v2
# `query_proj`/..., T5 and MPNet `q`/..., Mosaic-style `Wq`/..., `wq`/..., Funnel `q_head`/`k_head`/`v_head`.
# DeepSeek's multi-head latent attention (DeepSeek-AI 2024, "DeepSeek-V2", §2.1.2) computes the query by an
# up-projection `q_b_proj` (`q_proj` without a query compression) and the keys' non-rotary part and the values by
# one up-projection `kv_b_proj`: that is W_q and W_v there, adapted whole (and (IA)³'s keys and values).
QUERY_NAMES = frozenset({"query", "q_proj", "q_lin", "query_proj", "q", "Wq", "wq", "q_head", "q_b_proj"})
KEY_NAMES = frozenset({"key", "k_proj", "k_lin", "key_proj", "k", "Wk", "wk", "k_head", "kv_b_proj"})
VALUE_NAMES = frozenset({"value", "v_proj", "v_lin", "value_proj", "v", "Wv", "wv", "v_head", "kv_b_proj"})
FUSED_QKV_NAMES = frozenset({"c_attn", "qkv_proj", "query_key_value", "Wqkv", "W_pack", "qkv", "in_proj"})

# How a fused projection lays out its output rows (checked against each model's attention code in
# transformers 5.24): "blocks" = [q | k | v] (q: heads x head_dim rows, k and v: kv_heads x head_dim each;
# GPT-2's c_attn, Phi-3's qkv_proj, ModernBERT's Wqkv, Baichuan's W_pack); "per_head" = [q_h, k_h, v_h] for each
# head h (GPT-NeoX's and BLOOM's query_key_value: `view(..., heads, 3 * head_dim)`; DeBERTa's in_proj:
# `view(..., heads, -1).chunk(3, dim=-1)`); "per_group" = for each key/value head, its group of query heads then k
# then v (Falcon's new decoder architecture: `view(..., kv_heads, heads // kv_heads + 2, head_dim)`). The name
# alone is the layout for "blocks" names; query_key_value and in_proj differ by family, so they are named per model
# type (an unknown one is refused, not guessed).
FUSED_QKV_LAYOUTS: dict[str, str] = {"gpt_neox": "per_head", "bloom": "per_head", "falcon": "falcon",
                                     "deberta": "per_head"}
_NAMED_LAYOUT = frozenset({"query_key_value", "in_proj"})


def attention_shape(config) -> tuple[int, int, int]:
    """(query heads, key/value heads, head size) from a transformers config."""
    heads = next(getattr(config, name) for name in ("num_attention_heads", "n_head", "num_heads", "n_heads",
                                                     "encoder_attention_heads") if getattr(config, name, None))
    width = model_width(config)
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or width // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads
    if getattr(config, "model_type", None) == "falcon" and not config.new_decoder_architecture:
        kv_heads = 1 if config.multi_query else heads  # Falcon-7B: one key/value head (multi-query)
    return heads, kv_heads, head_dim


def model_width(config) -> int:
    """d_model: the width of the residual stream."""
    return next(getattr(config, name) for name in ("hidden_size", "n_embd", "d_model", "dim")
                if getattr(config, name, None))


def fused_qkv_rows(name: str, layer: nn.Module, config) -> tuple[list[tuple[int, int]], ...]:
    """The output rows of fused projection `name` that compute q, k and v: (q ranges, k ranges, v ranges)."""
    heads, kv_heads, d = attention_shape(config)
    kind = getattr(config, "model_type", None)
    layout = "blocks" if name.split(".")[-1] not in _NAMED_LAYOUT else FUSED_QKV_LAYOUTS.get(kind)
    if layout == "falcon":
        layout = "per_group" if config.new_decoder_architecture else "blocks" if config.multi_query else "per_head"
    if layout is None:
        raise TargetError(f"{name} fuses q, k and v in a layout deltatune does not know for model type {kind!r}; "
                          f"pass targets=[{name.split('.')[-1]!r}] to adapt the whole fused layer, or "
                          f"module names of separate projections")
    if layout == "blocks":  # [q (heads) | k (kv_heads) | v (kv_heads)]
        rows = ([(0, heads * d)], [(heads * d, (heads + kv_heads) * d)],
                [((heads + kv_heads) * d, (heads + 2 * kv_heads) * d)])
    elif layout == "per_head":  # head h: rows [3h d, (3h+1) d) are q, then k, then v
        rows = tuple([((3 * h + i) * d, (3 * h + i + 1) * d) for h in range(heads)] for i in range(3))
    else:  # per_group: group g of (heads/kv_heads q, 1 k, 1 v) heads; q rows merged per group
        per = heads // kv_heads + 2
        rows = ([(g * per * d, (g * per + per - 2) * d) for g in range(kv_heads)],
                [((g * per + per - 2) * d, (g * per + per - 1) * d) for g in range(kv_heads)],
                [((g * per + per - 1) * d, (g + 1) * per * d) for g in range(kv_heads)])
    width = output_features(layer)
    if max(end for ranges in rows for _, end in ranges) != width:
        raise TargetError(f"{name} has {width} outputs, but {heads} query and {kv_heads} key/value heads of size "
                          f"{d} in a {layout} layout make {rows[2][-1][1]}; pass targets=[...] explicitly")
    return rows


def fused_query_value_rows(name: str, layer: nn.Module, config) -> RowGroups:
    """The output rows of fused projection `name` that compute q and v: [q rows, v rows]."""
    q_rows, _, v_rows = fused_qkv_rows(name, layer, config)
    return [q_rows, v_rows]


def _discover_projections(model: nn.Module, names: frozenset, fused_rows, method: str, what: str) -> dict:
    """{layer: rows} of the projections named `names` in every attention layer (separate ones whole: None), else
    `fused_rows(name, layer, config)` of the fused ones; the task head is never one."""
    layers = block_linear_layers(model)
    separate = {name: None for name in layers if name.split(".")[-1] in names}
    if separate:
        return separate
    fused = {name: fused_rows(name, layer, model.config) for name, layer in layers.items()
             if name.split(".")[-1] in FUSED_QKV_NAMES}
    if fused:
        return fused
    raise TargetError(
        f"no default {method} targets for model type {model_type(model)!r}: no {what} projections found (looked for "
        f"{sorted(names | FUSED_QKV_NAMES)}); pass targets=[...] (module-name suffixes or a regex)"
        f"{' or targets=' + repr('all-linear') if method == 'LoRA' else ''}. Linear layers in this model: "
        f"{_summarise(linear_layer_names(model))}"
    )


def discover_query_value(model: nn.Module) -> dict[str, RowGroups | None]:
    """W_q and W_v of every attention layer, found by name: separate projections whole, or the q and v rows
    of fused ones (`fused_query_value_rows`). The task head is never a target."""
    return _discover_projections(model, QUERY_NAMES | VALUE_NAMES, fused_query_value_rows, "LoRA", "query/value")


def discover_key_value(model: nn.Module) -> dict[str, list[tuple[int, int]] | None]:
    """(IA)³'s l_k and l_v sites (Liu et al. 2022 §3.3): the key and value projections of every attention layer,
    found as LoRA's W_q and W_v are (`discover_query_value`): separate ones whole, the k and v rows of fused ones."""
    return _discover_projections(model, KEY_NAMES | VALUE_NAMES,
                                 lambda name, layer, config: sorted(sum(fused_qkv_rows(name, layer, config)[1:], [])),
                                 "(IA)³", "key/value")


def discover_ffn_outputs(model: nn.Module) -> list[str]:
    """(IA)³'s l_ff sites: in each block, the FFN's second linear layer W_2 — the last linear layer outside the
    attention whose output has the residual stream's width (BERT `output.dense`, `fc2`, `down_proj`, `c_proj`,
    `dense_4h_to_h`, ModernBERT `mlp.Wo`, a shared expert's `down_proj`), the adapters' feed-forward site
    (`discover_adapter_sites`) when that is a linear layer. A model without a block stack (ALBERT shares one
    layer across depth) is one block. A block whose feed-forward has no linear layer (experts stored as 3-D
    parameters) has none: (IA)³ rescales its keys and values only."""
    width = model_width(model.config)
    stacks = block_lists(model)
    blocks = [(f"{stack_name}.{index}", block) for stack_name, stack in stacks.items()
              for index, block in enumerate(stack)] if stacks else [("", model)]
    layers = block_linear_layers(model)
    found = []
    for prefix, block in blocks:
        candidates = [f"{prefix}.{name}" if prefix else name for name, layer in linear_layers(block).items()
                      if output_features(layer) == width and not _ATTENTION.search(name)
                      and not _CROSS_ATTENTION.search(name)]
        candidates = [name for name in candidates if name in layers]  # not the task head
        found += candidates[-1:]
    return found


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


def discover_adapter_sites(model: nn.Module) -> tuple[list[str], list[str]]:
    """(attention outputs, feed-forward outputs): per block, the module whose output is the sub-layer's
    output before its residual add (see _ATTENTION above); empty lists when the model has no block stack."""
    width = getattr(model.config, "hidden_size", None)
    attention_sites, ffn_sites = [], []
    for stack_name, stack in block_lists(model).items():
        for index, block in enumerate(stack):
            prefix = f"{stack_name}.{index}"
            attention, ffn = [], []
            for name, module in linear_layers(block).items():  # the base model's own layers, through wrappers
                if output_features(module) != width or _CROSS_ATTENTION.search(name):
                    continue
                (attention if _ATTENTION.search(name) else ffn).append(f"{prefix}.{name}")
            if not ffn:  # a mixture of experts whose experts are not linear layers: the whole feed-forward module
                ffn = [f"{prefix}.{name}" for name, _ in block.named_children() if name in _FEED_FORWARD_MODULES]
            attention_sites += attention[-1:]
            ffn_sites += ffn[-1:]
    return attention_sites, ffn_sites


def prefix_kind(model: nn.Module) -> str | None:
    """How prefix tuning's key/value prefixes reach attention (PREFIX_ARCHITECTURES), else "cache" for a model
    that reads a key/value cache handed to its forward (`reads_key_value_cache`); None: no way known."""
    kind = PREFIX_ARCHITECTURES.get(model_type(model))
    if kind is not None:
        return kind
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    return "cache" if reads_key_value_cache(model) else None


def reads_key_value_cache(model: nn.Module) -> bool:
    """Whether `model(..., cache=DynamicCache)` attends to the cache in every block: one forward pass on a dummy
    input with a one-position cache of zeros (a key/value head of the config's size per layer). A model that
    reads it appends its own keys and values (the cache grows by the input's length); one that ignores it, or
    whose attention has other shapes, does not."""
    from transformers import DynamicCache

    _, kv_heads, head_dim = attention_shape(model.config)
    layers = len(top_blocks(model)[1])
    reference = next(p for p in model.parameters() if p.is_floating_point())
    cache = DynamicCache()
    for layer in range(layers):
        zeros = reference.new_zeros(1, kv_heads, 1, head_dim)  # (batch, kv heads, 1 position, head size)
        cache.update(zeros, zeros.clone(), layer)
    inputs = dummy_inputs(model)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"].new_ones(1, 1), inputs["attention_mask"]], 1)
    try:
        with torch.no_grad():
            model(**inputs, cache=cache)
    except Exception:  # noqa: BLE001 - any failure means the model cannot take the prefixes this way
        return False
    return len(cache.layers) == layers and all(layer.keys.shape[-2] == 1 + inputs["input_ids"].shape[1]
                                               for layer in cache.layers)
