"""Each method's translation to and from Hugging Face PEFT's adapter format; its registry entry names it
(`MethodEntry.peft`), and `formats/peft.py` reads and writes the folders through it.

A peft adapter folder holds `adapter_config.json` (a `LoraConfig` or `PromptTuningConfig` as JSON) and
`adapter_model.safetensors`. Key names are exactly those peft 0.21's `save_pretrained` writes
(`get_peft_model_state_dict` drops the adapter name, and the `.modules_to_save.default` it uses in memory):

    deltatune delta key            peft key                                       shape
    <module>.lora_A                base_model.model.<module>.lora_A.weight        (r, d_in)
    <module>.lora_B                base_model.model.<module>.lora_B.weight        (d_out, r)
    <head>.<param>  (LoRA)         base_model.model.<head>.<param>                (modules_to_save)
    prompt_embeddings              prompt_embeddings                              (P, d)
    <head>.<param>  (prompt)       base_model.<head>.<param>                      (modules_to_save)
    prefix_key_values              prompt_embeddings (PREFIX_TUNING)              (P, layers * 2 * d_kv)
    <head>.<param>  (prefix)       base_model.<head>.<param>                      (modules_to_save)
    <module>.dora.magnitude        base_model.model.<module>.lora_magnitude_vector (d_out,)  (use_dora)
    <module>.ia3.l                 base_model.model.<module>.ia3_l                (d_out, 1)  (IA3)
    <module>.ia3.l_ff              base_model.model.<module>.ia3_l                (1, d_in)   (feedforward_modules)

Both scale the update the same way: alpha / r, or alpha / sqrt(r) with `use_rslora`.

GPT-2's fused `c_attn` computes [q | k | v]; deltatune adapts only the q and v slices (one A, B pair per
slice), peft's LoRA adapts the whole fused output. The slices export exactly as one rank-2r LoRA:

    A' = [A_q; A_v]   (2r x d_in)       B' = [[B_q, 0], [0, 0], [0, B_v]]   (3d x 2r)

so B' A' = [B_q A_q; 0; B_v A_v], with alpha' chosen so that alpha'/r' (or alpha'/sqrt(r')) equals
deltatune's scaling: peft then computes the same function (training on in peft may fill the zero blocks).

Prefix tuning: both libraries hand the prefixes to the model as its key/value cache (positions count on
from P), so one (layers, 2, kv_heads, P, head_dim) tensor is peft's `prompt_embeddings` reshaped: for each
virtual token, [layer 0 K, layer 0 V, layer 1 K, ...] with kv_heads x head_dim numbers each (peft's
`token_dim` under grouped-query attention). peft saves the MLP's output even with `prefix_projection`, as
deltatune does. T5 is refused both ways: peft's T5 prefix reaches only the decoder's self-attention.

DoRA is peft's LoRA with `use_dora` and the same magnitude m over each layer's whole output (peft applies it
as b + m / ||W + s B A|| ⊙ (W x + s B A x), deltatune too). (IA)³ on GPT-2's fused `c_attn` rescales only the k
and v slices; peft's vector covers the whole output, so the q slice is written as ones. A layer whose input
and output both carry a vector has no peft equivalent (peft rescales a feedforward module's input only).

Prompt tuning exports only where both libraries put the prompt in the same place: in front of the
input (decoders). For BERT-style encoders deltatune puts the prompt after [CLS] (the head reads [CLS]),
peft in front of it; such a prompt would run a different model in the other library, so both directions
refuse it. Anything peft can express that deltatune cannot (per-module ranks, trained biases,
LoRA on embeddings, ...) is refused on reading, never loaded approximately.
"""


from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from deltatune.core.architectures import (
    CONV1D_MODEL_TYPES,
    DEFAULT_HEAD_NAMES,
    DEFAULT_LORA_TARGETS,
    IA3_TARGETS,
    PREFIX_ARCHITECTURES,
    parse_target,
)
from deltatune.errors import DeltaError
from deltatune.methods.lora_experts import from_peft_factors, to_peft_factors
from deltatune.methods.prompt import prompt_layout

LORA_PREFIX = "base_model.model."  # peft's key prefix for LoRA (and IA3) weights and their heads
DORA_MAGNITUDE = ".dora.magnitude"  # deltatune's key ending for a DoRA magnitude (methods/dora.py)
PROMPT_HEAD_PREFIX = "base_model."  # ... and for the heads of prompt-learning adapters

# peft LoraConfig fields that change the computed function: deltatune reads an adapter only where each is
# unset (None, False, empty) or equal to the value given here
LORA_UNSUPPORTED = {
    "use_dora": False, "lora_bias": False, "bias": "none", "rank_pattern": {}, "alpha_pattern": {},
    "layers_to_transform": None, "layer_replication": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None, "use_qalora": False, "use_bdlora": None,
    "arrow_config": None, "kasa_config": None, "monteclora_config": None, "velora_config": None,
    "megatron_config": None,
}

# peft initialisations that subtract the initial A, B from the base weights (PiSSA, OLoRA, CorDA): their adapters
# as saved need that residual base
RESIDUAL_INITS = {"pissa", "olora", "corda"}


Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class PeftTranslation:
    """How one method's delta is written as a peft adapter and read back from one (see the module doc)."""

    peft_type: str  # adapter_config.json's `peft_type`
    # (delta tensors, delta.json, the method's config) -> (peft tensors, adapter_config.json)
    export: Callable[[Tensors, dict, Any], tuple[Tensors, dict]]
    # (peft tensors, adapter_config.json, folder) -> (delta tensors, method, its settings, head keys)
    read: Callable[[Tensors, dict, Path], tuple[Tensors, str, dict[str, Any], list[str]]]
    # (the DeltaModel it loads onto) -> why deltatune would run this adapter differently from peft (None: it fits)
    refusal: Callable[[Any], str | None] = lambda model: None


# ---- deltatune -> peft ---------------------------------------------------------------------------------

def _lora_to_peft(tensors: Tensors, meta: dict, config) -> tuple[Tensors, dict]:
    base = meta.get("base") or {}
    head_keys = list(meta.get("head_keys") or [])
    heads = _head_modules(head_keys)
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}  # module -> (peft r, peft lora_alpha)
    experts = {k: t for k, t in tensors.items() if k not in head_keys and t.dim() == 3}
    out.update(_experts_to_peft(experts, config, meta.get("output_rows") or {}))
    for module in sorted({k.rsplit(".", 1)[0] for k in tensors if k not in head_keys and k not in experts}):
        A, B = tensors[f"{module}.lora_A"], tensors[f"{module}.lora_B"]
        if any(module == h or module.startswith(h + ".") for h in heads):
            raise DeltaError(f"LoRA on {module}, inside the trained head, has no peft equivalent (peft never "
                             f"puts LoRA inside modules_to_save)")
        saved = (meta.get("output_rows") or {}).get(module)  # fused rows found from the model's structure
        if saved is not None:
            layout = [[tuple(span) for span in group] for group in saved["rows"]], saved["out_features"]
        else:
            layout = _slices(module, config.targets, base.get("model_type"), A.shape[0] // config.r, B.shape[0])
        if layout is not None:  # fused output rows -> one block LoRA over the whole output (module doc)
            groups, out_features = layout
            widths = [sum(end - start for start, end in group) for group in groups]
            if len(groups) * config.r != A.shape[0] or sum(widths) != B.shape[0]:
                raise DeltaError(f"{module}: the delta's LoRA shapes do not match its output rows {groups}")
            block = B.new_zeros(out_features, A.shape[0])  # (d_out, G*r)
            for g, (group, B_g) in enumerate(zip(groups, B.split(widths))):
                rows = torch.cat([torch.arange(start, end) for start, end in group])
                block[rows, g * config.r : (g + 1) * config.r] = B_g
            B = block
        rank = A.shape[0]
        ranks[module] = (rank, config.alpha if rank == config.r else config.scaling * _rank_divisor(config, rank))
        out[f"{LORA_PREFIX}{module}.lora_A.weight"] = A
        out[f"{LORA_PREFIX}{module}.lora_B.weight"] = B
    out.update({LORA_PREFIX + k: tensors[k] for k in head_keys})
    # the most common (r, alpha) is the config's; modules that differ go to peft's rank/alpha patterns
    (r, alpha), _ = Counter(ranks.values()).most_common(1)[0] if ranks else ((config.r, config.alpha), 0)
    odd = {m: ra for m, ra in ranks.items() if ra != (r, alpha)}
    peft_config = {
        **_common_config(meta),
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        "target_modules": sorted(ranks) or None,  # full module names: peft matches them exactly
        "target_parameters": list(config.expert_parameters) if config.expert_parameters else None,
        "fan_in_fan_out": base.get("model_type") in CONV1D_MODEL_TYPES,
        "rank_pattern": {re.escape(m): ra[0] for m, ra in odd.items()},
        "alpha_pattern": {re.escape(m): ra[1] for m, ra in odd.items()},
        "modules_to_save": heads or None,
        "bias": "none",
        "use_dora": False,
        "init_lora_weights": True,
    }
    return out, peft_config


def _experts_to_peft(tensors: Tensors, config, layouts: dict) -> Tensors:
    """Per-expert LoRA (methods/lora_experts.py) as peft's `target_parameters` keys: peft wraps one experts module
    once per adapted parameter, in the module's own parameter order, the first innermost (`BaseTuner.
    _inject_parameters` walks `named_parameters(recurse=False)`), so the i-th of n is saved under `<module>.` +
    `base_layer.` * (n - 1 - i) + `lora_A.weight`, its factors (r E, d_in) and (d_out, r E). That order is the
    one the delta recorded (`ExpertLoRA.saved_layout`), else the config's."""
    configured = [name.rsplit(".", 1)[-1] for name in config.expert_parameters or []]
    out = {}
    for key in [k for k in tensors if k.endswith(".lora_A")]:
        module, _, name = key.removesuffix(".lora_A").rpartition(".")
        order = (layouts.get(module) or {}).get("expert_parameters") or configured
        present = [n for n in order if f"{module}.{n}.lora_A" in tensors]
        nesting = "base_layer." * (len(present) - 1 - present.index(name))
        A, B = to_peft_factors(tensors[key], tensors[f"{module}.{name}.lora_B"])
        out[f"{LORA_PREFIX}{module}.{nesting}lora_A.weight"] = A
        out[f"{LORA_PREFIX}{module}.{nesting}lora_B.weight"] = B
    return out


def _dora_to_peft(tensors: Tensors, meta: dict, config) -> tuple[Tensors, dict]:
    """DoRA: its LoRA part as LoRA is written, plus each layer's magnitude, and `use_dora`."""
    magnitudes = {k.removesuffix(DORA_MAGNITUDE): t for k, t in tensors.items() if k.endswith(DORA_MAGNITUDE)}
    out, peft_config = _lora_to_peft({k: t for k, t in tensors.items() if not k.endswith(DORA_MAGNITUDE)}, meta, config)
    out.update({f"{LORA_PREFIX}{module}.lora_magnitude_vector": m for module, m in magnitudes.items()})
    return out, {**peft_config, "use_dora": True}


def _ia3_to_peft(tensors: Tensors, meta: dict, config) -> tuple[Tensors, dict]:
    model_type = (meta.get("base") or {}).get("model_type")
    head_keys = list(meta.get("head_keys") or [])
    out: dict[str, torch.Tensor] = {}
    outputs, inputs = set(), set()
    for key in sorted(set(tensors) - set(head_keys)):
        module, _, name = key.rpartition(".ia3.")
        if name == "l_ff":  # (d_in,) -> peft's (1, d_in)
            inputs.add(module)
            out[f"{LORA_PREFIX}{module}.ia3_l"] = tensors[key].reshape(1, -1)
        else:  # (d_out,) over the targeted output slices -> peft's (d_out, 1) over all outputs
            outputs.add(module)
            targets = (IA3_TARGETS.get(model_type) or ([],))[0] if config.targets is None else config.targets
            out[f"{LORA_PREFIX}{module}.ia3_l"] = _whole_output(module, targets, tensors[key]).reshape(-1, 1)
    both = sorted(outputs & inputs)
    if both:
        raise DeltaError(f"(IA)³ rescales both the input and the output of {both[0]}; peft rescales a layer's input "
                         f"or its output, not both: no peft equivalent")
    peft_config = {
        **_common_config(meta),
        "peft_type": "IA3",
        "target_modules": sorted(outputs | inputs),  # full module names: matched exactly
        "feedforward_modules": sorted(inputs),
        "fan_in_fan_out": model_type in CONV1D_MODEL_TYPES,
        "modules_to_save": _head_modules(head_keys) or None,
        "init_ia3_weights": True,
    }
    out.update({LORA_PREFIX + k: tensors[k] for k in head_keys})
    return out, peft_config


def _chosen_slices(module: str, targets) -> list[tuple[int, int]] | None:
    """The (slice index, slices) pairs the targets name on `module` (`c_attn[1/3]` -> (1, 3)), sorted; None when
    the targets adapt the module whole (or name no slice of it, or are one string such as "all-linear")."""
    if targets is None or isinstance(targets, str):
        return None
    chosen = []
    for target in targets:
        name, index, parts = parse_target(target)
        if module == name or module.endswith("." + name):
            if index is None:
                return None
            chosen.append((index, parts))
    return sorted(chosen) or None


def _whole_output(module: str, targets, scale: torch.Tensor) -> torch.Tensor:
    """An output vector over fused slices (`c_attn[1/3]`, `c_attn[2/3]`) placed in the whole output, ones
    elsewhere; the vector itself where the targets name the whole layer."""
    chosen = _chosen_slices(module, targets)
    if not chosen:
        return scale
    width = scale.numel() // len(chosen)
    whole = scale.new_ones(chosen[0][1] * width)
    for position, (index, _) in enumerate(chosen):
        whole[index * width : (index + 1) * width] = scale[position * width : (position + 1) * width]
    return whole


def _rank_divisor(config, rank: int) -> float:
    return math.sqrt(rank) if config.use_rslora else rank


def _slices(
    module: str, targets, model_type: str | None, n_slices: int, rows: int
) -> tuple[list[list[tuple[int, int]]], int] | None:
    """The output row groups (one slice each) a LoRA on `module` adapts and the layer's output width, or None for
    the whole output; read from the config's targets as `targets.resolve_lora_targets` reads them."""
    targets = DEFAULT_LORA_TARGETS.get(model_type) if targets is None else targets
    chosen = _chosen_slices(module, targets)
    if not chosen:
        return None
    if len(chosen) != n_slices or len({parts for _, parts in chosen}) != 1:
        raise DeltaError(f"{module}: the delta's LoRA shapes do not match its targets {targets}")
    width = rows // n_slices
    parts = chosen[0][1]
    return [[span] for span in sorted((index * width, (index + 1) * width) for index, _ in chosen)], parts * width


def _head_modules(head_keys: list[str]) -> list[str]:
    """Module names for peft's modules_to_save: the standard head a key lies in (`classifier`), else the
    module that owns the parameter."""
    modules = []
    for key in head_keys:
        parts = key.split(".")
        standard = [i for i, part in enumerate(parts[:-1]) if part in DEFAULT_HEAD_NAMES]
        module = ".".join(parts[: standard[0] + 1]) if standard else key.rsplit(".", 1)[0]
        if module not in modules:
            modules.append(module)
    return modules


def _common_config(meta: dict) -> dict[str, Any]:
    base = meta.get("base") or {}
    return {
        "task_type": _task_type(base.get("class") or ""),
        "base_model_name_or_path": base.get("name_or_path"),
        "inference_mode": True,
        "revision": None,
    }


def _task_type(class_name: str) -> str | None:
    """peft's task type for a transformers model class (it picks the PeftModel subclass)."""
    endings = {
        "ForSequenceClassification": "SEQ_CLS",
        "ForCausalLM": "CAUSAL_LM",
        "LMHeadModel": "CAUSAL_LM",
        "ForConditionalGeneration": "SEQ_2_SEQ_LM",
        "ForTokenClassification": "TOKEN_CLS",
        "ForQuestionAnswering": "QUESTION_ANS",
    }
    return next((task for ending, task in endings.items() if class_name.endswith(ending)), None)


def _prompt_to_peft(tensors: Tensors, meta: dict, config) -> tuple[Tensors, dict]:
    base = meta.get("base") or {}
    layout = _layout_of(base.get("model_type"), base.get("class") or "")
    if layout != "prepend":
        raise DeltaError(_layout_refusal(base.get("model_type"), layout))
    prompt = tensors["prompt_embeddings"]  # (P, d)
    head_keys = list(meta.get("head_keys") or [])
    out = {"prompt_embeddings": prompt, **{PROMPT_HEAD_PREFIX + k: tensors[k] for k in head_keys}}
    config = {
        **_common_config(meta),
        "peft_type": "PROMPT_TUNING",
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM",  # how it started; the weights are the trained ones
        "modules_to_save": _head_modules(head_keys) or None,
    }
    return out, config


def _prefix_to_peft(tensors: Tensors, meta: dict, config) -> tuple[Tensors, dict]:
    model_type = (meta.get("base") or {}).get("model_type")
    _check_prefix_architecture(model_type)
    if _common_config(meta)["task_type"] != "CAUSAL_LM":
        # peft 0.21's sequence-classification prefix path looks for a `past_key_values` forward argument, which
        # transformers 5 renamed `cache`: peft refuses to run such an adapter, so none is written
        raise DeltaError(f"prefix tuning on {(meta.get('base') or {}).get('class')}: peft runs prefix tuning only "
                         f"on causal LMs (its classification path needs a past_key_values argument that "
                         f"transformers 5 models no longer have); export a causal-LM delta")
    prefix = tensors["prefix_key_values"]  # (layers, 2, kv_heads, P, head_dim)
    layers, _, heads, length, head_dim = prefix.shape
    flat = prefix.permute(3, 0, 1, 2, 4).reshape(length, -1)  # (P, layers * 2 * kv_heads * head_dim)
    head_keys = list(meta.get("head_keys") or [])
    out = {"prompt_embeddings": flat, **{PROMPT_HEAD_PREFIX + k: tensors[k] for k in head_keys}}
    config = {
        **_common_config(meta),
        "peft_type": "PREFIX_TUNING",
        "num_virtual_tokens": length,
        "token_dim": heads * head_dim,
        "num_layers": layers,
        "num_attention_heads": heads,
        "num_transformer_submodules": 1,
        "encoder_hidden_size": meta["config"].get("hidden"),
        "prefix_projection": False,  # the file holds the prefixes themselves (the MLP's output)
        "modules_to_save": _head_modules(head_keys) or None,
    }
    return out, config


def _check_prefix_architecture(model_type: str | None) -> None:
    if PREFIX_ARCHITECTURES.get(model_type) != "cache":
        raise DeltaError(f"prefix tuning on {model_type}: peft's prefixes reach only the decoder's self-attention "
                         f"of an encoder-decoder, deltatune's also the encoder's; not converted"
                         if PREFIX_ARCHITECTURES.get(model_type) else
                         f"prefix tuning does not support model type {model_type!r}")


def _layout_of(model_type: str | None, class_name: str) -> str:
    """Where deltatune puts a prompt for this model (prompt.prompt_layout, from the description alone)."""
    config = SimpleNamespace(model_type=model_type, is_encoder_decoder=class_name.endswith("ForConditionalGeneration"))
    return prompt_layout(SimpleNamespace(config=config))


def _layout_refusal(model_type: str | None, layout: str) -> str:
    where = "after the first token ([CLS])" if layout == "after_first" else "in the encoder input"
    return (f"prompt tuning on {model_type}: deltatune puts the prompt {where}, peft in front of the input "
            f"(and per encoder/decoder for seq2seq); the same prompt would run a different model in the other "
            f"library, so it is not converted")


# ---- peft -> deltatune ---------------------------------------------------------------------------------

def _experts_from_peft(tensors: Tensors, peft_config: dict) -> Tensors:
    """peft's `target_parameters` keys (the reverse of `_experts_to_peft`) -> {`<module>.<param>.lora_A`: (E, r,
    d_in), ...}; the keys read are removed from `tensors`. A nesting depth is named here by the order the adapter
    config lists the parameters in; `order_experts` renames them by the experts module's own order once the model
    is known (peft nests in that order)."""
    targets = peft_config.get("target_parameters") or []
    owners = {name.rpartition(".")[0] for name in targets}
    found: dict[str, tuple[str, int]] = {}  # peft key -> (module, nesting depth)
    for key in tensors:
        match = re.fullmatch(r"base_model\.model\.(.+?)\.((?:base_layer\.)*)lora_A\.weight", key)
        if match and any(not owner or match[1] == owner or match[1].endswith("." + owner) for owner in owners):
            found[key] = (match[1], match[2].count("base_layer."))
    delta = {}
    for key, (module, depth) in found.items():
        names = _listed_experts(module, targets)
        A, B = tensors.pop(key), tensors.pop(key.replace("lora_A.weight", "lora_B.weight"))
        experts = A.shape[0] // peft_config["r"]
        name = names[len(names) - 1 - depth]
        delta[f"{module}.{name}.lora_A"], delta[f"{module}.{name}.lora_B"] = from_peft_factors(A, B, experts)
    return delta


def _listed_experts(module: str, targets: list[str]) -> list[str]:
    """The parameter names of `target_parameters` entries that name `module`, in the order listed."""
    return [t.rsplit(".", 1)[-1] for t in targets if not t.rpartition(".")[0] or module == t.rpartition(".")[0]
            or module.endswith("." + t.rpartition(".")[0])]


def order_experts(delta: Tensors, settings: dict, model) -> Tensors:
    """Rename a peft adapter's expert keys (`_experts_from_peft`) by the experts modules' own parameter order in
    `model`, the order peft nested its wrappers in."""
    targets = settings.get("expert_parameters") or []
    renamed = dict(delta)
    for module in sorted({k.rsplit(".", 2)[0] for k, t in delta.items() if t.dim() == 3 and k.endswith(".lora_A")}):
        listed = [n for n in _listed_experts(module, targets) if f"{module}.{n}.lora_A" in delta]
        experts = model.get_submodule(module)
        experts = getattr(experts, "base_layer", experts)  # already wrapped by a loaded task
        own = [n for n, _ in experts.named_parameters(recurse=False) if n in listed]
        for was, name in zip(listed, own):
            for part in ("lora_A", "lora_B"):
                renamed[f"{module}.{name}.{part}"] = delta[f"{module}.{was}.{part}"]
    return renamed


def _lora_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict, path: Path):
    dora = peft_config.get("use_dora") is True  # DoRA: LoRA plus a magnitude per layer (methods/dora.py)
    unsupported = {k: v for k, ok in LORA_UNSUPPORTED.items()
                   if (v := peft_config.get(k)) and v != ok and not (dora and k == "use_dora")}
    if unsupported:
        raise DeltaError(f"{path}: peft LoRA options deltatune does not compute exactly (a task has one rank and "
                         f"plain LoRA or DoRA on linear layers): {unsupported}")
    init = peft_config.get("init_lora_weights")
    if isinstance(init, str) and init.split("_")[0] in RESIDUAL_INITS:
        raise DeltaError(f"{path}: a peft {init} adapter applies to the residual base it was trained on, not to the "
                         f"original model; save it in peft with save_pretrained(..., path_initial_model_for_weight_"
                         f"conversion=<the initial adapter>) to get the plain LoRA of the original base, and load that")
    tensors = dict(tensors)
    experts = _experts_from_peft(tensors, peft_config) if peft_config.get("target_parameters") else {}
    delta: dict[str, torch.Tensor] = dict(experts)
    head_keys: list[str] = []
    for key, tensor in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", key)
        magnitude = re.fullmatch(r"base_model\.model\.(.+)\.lora_magnitude_vector", key) if dora else None
        if match:
            delta[f"{match[1]}.{match[2]}"] = tensor
        elif magnitude:
            delta[magnitude[1] + DORA_MAGNITUDE] = tensor
        else:
            _keep_head(key, tensor, LORA_PREFIX, peft_config, delta, head_keys, f"{path}: peft key {key!r} is neither "
                       f"LoRA A/B of a linear layer nor a modules_to_save head; deltatune cannot load it exactly")
    modules = sorted({k.rsplit(".", 1)[0] for k in delta if k not in head_keys and k not in experts
                      and not k.endswith(DORA_MAGNITUDE)})
    if not modules and not experts:
        raise DeltaError(f"{path}: the peft adapter holds no LoRA weights")
    ranks = {delta[f"{m}.lora_A"].shape[0] for m in modules} | {A.shape[1] for k, A in experts.items()
                                                                  if k.endswith(".lora_A")}
    if ranks != {peft_config.get("r")}:
        raise DeltaError(f"{path}: LoRA ranks {sorted(ranks)} differ from the config's r={peft_config.get('r')}")
    settings = {  # peft LoraConfig names -> deltatune's (None: peft's default)
        "r": peft_config["r"],
        "alpha": peft_config.get("lora_alpha", 8),
        "dropout": peft_config.get("lora_dropout") or 0.0,
        "targets": modules,  # the exact modules the adapter holds
        "use_rslora": peft_config.get("use_rslora") or False,
        **({"expert_parameters": list(peft_config["target_parameters"])} if experts else {}),
    }
    return delta, "dora" if dora else "lora", settings, head_keys


def _ia3_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict, path: Path):
    """peft's `ia3_l` of a feedforward module (1, d_in) rescales its input, of another module (d_out, 1) its
    output: deltatune's `l_ff` and `l` on exactly those modules."""
    feedforward = peft_config.get("feedforward_modules") or []
    delta: dict[str, torch.Tensor] = {}
    head_keys: list[str] = []
    outputs, inputs = [], []
    for key, tensor in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.ia3_l", key)
        if match:  # peft's rule (IA3Model._check_target_module_feedforward): a regex, else name endings
            module = match[1]
            is_input = (re.fullmatch(feedforward, module) is not None if isinstance(feedforward, str)
                        else any(module.endswith(name) for name in feedforward))
            if tensor.dim() != 2 or tensor.shape[0 if is_input else 1] != 1:
                raise DeltaError(f"{path}: {key} has shape {tuple(tensor.shape)}; peft's (IA)³ vectors are (1, d_in) "
                                 f"for feedforward modules and (d_out, 1) for the others")
            (inputs if is_input else outputs).append(module)
            delta[f"{module}.ia3.{'l_ff' if is_input else 'l'}"] = tensor.reshape(-1)
        else:
            _keep_head(key, tensor, LORA_PREFIX, peft_config, delta, head_keys, f"{path}: peft key {key!r} is "
                       f"neither an (IA)³ vector of a linear layer nor a modules_to_save head; deltatune cannot "
                       f"load it exactly")
    if not outputs and not inputs:
        raise DeltaError(f"{path}: the peft adapter holds no (IA)³ vectors")
    return delta, "ia3", {"targets": sorted(outputs), "feedforward": sorted(inputs)}, head_keys


def _head_name(key: str, prefix: str, peft_config: dict) -> str | None:
    """The deltatune name of a peft key under `prefix` that is a parameter of a modules_to_save module (peft matches
    them as name suffixes), else None."""
    if not key.startswith(prefix):
        return None
    name = key[len(prefix) :]
    modules = peft_config.get("modules_to_save") or []
    module = name.rsplit(".", 1)[0]
    return name if any(re.fullmatch(rf"(.*\.)?{re.escape(m)}(\..*)?", module) for m in modules) else None


def _keep_head(key: str, tensor: torch.Tensor, prefix: str, peft_config: dict, delta: dict[str, torch.Tensor],
               head_keys: list[str], refusal: str) -> None:
    """A peft key that is not the method's own: kept in `delta` as a task-head parameter (its name added to
    `head_keys`) if it belongs to a modules_to_save module, else refused with `refusal`."""
    head = _head_name(key, prefix, peft_config)
    if head is None:
        raise DeltaError(refusal)
    head_keys.append(head)
    delta[head] = tensor


def _prompt_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict, path: Path):
    if (peft_config.get("num_transformer_submodules") or 1) != 1:
        raise DeltaError(f"{path}: a peft prompt for an encoder-decoder (one per submodule) has no deltatune "
                         f"equivalent")
    delta, head_keys = {}, []
    for key, tensor in tensors.items():
        if key == "prompt_embeddings":
            delta[key] = tensor
        else:
            _keep_head(key, tensor, PROMPT_HEAD_PREFIX, peft_config, delta, head_keys,
                       f"{path}: unexpected key {key!r} in a peft prompt-tuning adapter")
    if "prompt_embeddings" not in delta:
        raise DeltaError(f"{path}: the peft adapter holds no prompt_embeddings")
    return delta, "prompt", {"length": delta["prompt_embeddings"].shape[0]}, head_keys


def _prefix_from_peft(tensors: dict[str, torch.Tensor], peft_config: dict, path: Path):
    if (peft_config.get("num_transformer_submodules") or 1) != 1:
        raise DeltaError(f"{path}: a peft prefix for an encoder-decoder (decoder self-attention only) has no "
                         f"deltatune equivalent")
    delta, head_keys = _prompt_from_peft(tensors, peft_config, path)[0::3]
    flat = delta.pop("prompt_embeddings")  # (P, layers * 2 * token_dim)
    try:
        length, layers = int(peft_config["num_virtual_tokens"]), int(peft_config["num_layers"])
        heads, width = int(peft_config["num_attention_heads"]), int(peft_config["token_dim"])
        # (P, layers, 2, heads, head_dim) -> (layers, 2, heads, P, head_dim)
        delta["prefix_key_values"] = flat.view(length, layers, 2, heads, width // heads).permute(1, 2, 3, 0, 4)
    except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as error:
        raise DeltaError(f"{path}: peft prefix of shape {tuple(flat.shape)} does not match its config "
                         f"(num_virtual_tokens, num_layers, num_attention_heads, token_dim): {error}") from error
    hidden = peft_config.get("encoder_hidden_size") or 512
    return delta, "prefix", {"length": length, "reparameterize": bool(peft_config.get("prefix_projection")),
                             "hidden": int(hidden)}, head_keys


# ---- refusals on loading --------------------------------------------------------------------------------
def _prompt_refusal(model) -> str | None:
    layout = prompt_layout(model.base_model)
    return None if layout == "prepend" else _layout_refusal(model.base_identity.get("model_type"), layout)


def _prefix_refusal(model) -> str | None:
    try:
        _check_prefix_architecture(model.base_identity.get("model_type"))
    except DeltaError as error:
        return str(error)
    return None


# what each method's registry entry names (`MethodEntry.peft`); DoRA is peft's LoRA with `use_dora`, so one reader
# (LoRA's) reads both
LORA = PeftTranslation("LORA", _lora_to_peft, _lora_from_peft)
DORA = PeftTranslation("LORA", _dora_to_peft, _lora_from_peft)
IA3 = PeftTranslation("IA3", _ia3_to_peft, _ia3_from_peft)
PROMPT_TUNING = PeftTranslation("PROMPT_TUNING", _prompt_to_peft, _prompt_from_peft, _prompt_refusal)
PREFIX_TUNING = PeftTranslation("PREFIX_TUNING", _prefix_to_peft, _prefix_from_peft, _prefix_refusal)
