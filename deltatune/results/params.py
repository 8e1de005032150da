"""Trainable-parameter table of every method for one architecture, built without weights.

Reproduces a published comparison table ("a transformer with 350M parameters and 24 layers": RoBERTa-large;
README says where it comes from) by actually attaching each method to the model built on the meta device,
so the counts come from the same code that trains, not from formulas. Every registered method gets a row:
those the table lists with its settings and figure, any other with its default settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from deltatune.methods.registry import METHODS

# Architectures known offline: model_type + config values of the public checkpoints.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "roberta-large": ("roberta", dict(vocab_size=50265, hidden_size=1024, num_hidden_layers=24,
                                      num_attention_heads=16, intermediate_size=4096,
                                      max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "roberta-base": ("roberta", dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                     num_attention_heads=12, intermediate_size=3072,
                                     max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)),
    "bert-large": ("bert", dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                                num_attention_heads=16, intermediate_size=4096)),
    "bert-base": ("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                               num_attention_heads=12, intermediate_size=3072)),
    "gpt2-medium": ("gpt2", dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024,
                                 pad_token_id=50256)),
    "gpt2": ("gpt2", dict(vocab_size=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                          pad_token_id=50256)),
}


@dataclass(frozen=True)
class PublishedRow:
    """One row of the published table: method, settings, the figure it prints, and our reading."""

    label: str
    method: str
    settings: dict
    published: str
    note: str = ""
    arch: str | None = None  # the architecture the published figure is for (None: every table)


PUBLISHED_ROWS = [
    PublishedRow("Prompt tuning (length 20)", "prompt", {"length": 20}, "15k (0.006%)",
                 "the published 15k is 20 x 768 (a 768-wide model); 20 x 1024 = 20,480 is its 0.006%"),
    PublishedRow("Adapters (dim 64)", "adapter", {"bottleneck": 64}, "6M (2%)",
                 "24 layers x 2 adapters x (2 x 1024 x 64 + 64 + 1024); '+ norms': the 49 LayerNorms' g, b"),
    PublishedRow("LoRA (dim 8)", "lora", {"r": 8}, "0.8M (0.22%)", "2 x 24 layers x 2 (q,v) x 1024 x 8"),
    PublishedRow("BitFit", "bitfit", {}, "0.32M (0.09%)",
                 "q,k,v, attention-output, 2 FFN and 2 LayerNorm biases per layer; the published 0.32M "
                 "is higher than its own formulas give (Zaken et al. 2021, Table 1: 0.08%)"),
    PublishedRow("Full fine-tuning", "full", {}, "350M (100%)", ""),
    # the LoRA paper's comparison tables (Hu et al. 2021, Tables 2 and 3), rows from other papers
    PublishedRow("FT^Top2 (k=2)", "top_layers", {"k": 2}, "25.19M",
                 "2 blocks x 12,596,224 (ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj) + ln_f 2,048; "
                 "the LM head is tied to the embeddings and not counted (Li & Liang 2021)", arch="gpt2-medium"),
    PublishedRow("Adapter^L (m=6)", "adapter", {"placement": "lin", "bottleneck": 6, "train_norms": False},
                 "0.37M", "24 x (2 x 1024 x 6 + 6 + 1024 + 2 x 1024 adapter LayerNorm) (Lin et al. 2020)",
                 arch="gpt2-medium"),
    PublishedRow("Adapter^L (m=224)", "adapter", {"placement": "lin", "bottleneck": 224, "train_norms": False},
                 "11.09M", "24 x (2 x 1024 x 224 + 224 + 1024 + 2 x 1024); without the LayerNorm it would be 11.04M",
                 arch="gpt2-medium"),
    PublishedRow("Adpt^D (m=16, skip 6)", "adapter", {"bottleneck": 16, "skip_layers": 6}, "0.3M",
                 "AdapterDrop: Houlsby adapters in the top 6 of 12 blocks, 12 x (2 x 768 x 16 + 16 + 768)",
                 arch="roberta-base"),
    PublishedRow("Adpt^D (m=48, skip 6)", "adapter", {"bottleneck": 48, "skip_layers": 6}, "0.9M",
                 "12 x (2 x 768 x 48 + 48 + 768) = 0.89M", arch="roberta-base"),
    PublishedRow("Prefix tuning (length 10)", "prefix", {"length": 10}, "0.35M (GPT2-M)",
                 "Li & Liang's K/V form: 10 x 2 (K, V) x {kv_width} x {layers} layers; the LoRA paper's PreLayer "
                 "count (Hu et al. 2021 section 5.1) is 10 x {width} x {layers} = {prelayer:,}: it counts one "
                 "activation per layer where attention needs that token's key and value; its 0.35M for GPT-2 M "
                 "is about the 0.1% Li & Liang report, which no whole length gives exactly in either count"),
]


def build_config(arch: str):
    """A transformers config for a named architecture, a local folder, or (with a hub) a model name."""
    from transformers import AutoConfig

    if arch in ARCHITECTURES:
        model_type, values = ARCHITECTURES[arch]
        config = AutoConfig.for_model(model_type, **values)
    else:
        from deltatune.models import resolve_model_path

        path = resolve_model_path(arch)
        if not Path(path).exists() and "/" not in arch:
            raise ValueError(
                f"unknown architecture {arch!r}: use one of {sorted(ARCHITECTURES)}, a local model folder, "
                "the shortcuts 'minilm'/'smollm2', or a hub name"
            )
        config = AutoConfig.from_pretrained(path)
    config.num_labels = 2
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None) or 0
    return config


def build_on_meta(config) -> nn.Module:
    """The sequence-classification model for `config`, with no memory for weights."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        return AutoModelForSequenceClassification.from_config(config)


@dataclass
class ParamsRow:
    label: str
    method: str
    method_parameters: int | None
    extra_parameters: int  # trained besides the method's own (adapter LayerNorms)
    head_parameters: int
    total_parameters: int
    published: str
    note: str
    error: str | None = None

    @property
    def percent(self) -> float | None:
        if self.method_parameters is None:
            return None
        return 100.0 * self.method_parameters / self.total_parameters


def parameter_table(arch: str) -> tuple[list[ParamsRow], object]:
    """Attach every registered method to `arch` (on the meta device) and count parameters: the published
    table's rows first, with their settings, then any method it does not list, with default settings."""
    from deltatune.delta import attach

    config = build_config(arch)
    listed = {row.method for row in PUBLISHED_ROWS}
    rows = []
    for row in PUBLISHED_ROWS + [PublishedRow(name, name, {}, "-") for name in METHODS if name not in listed]:
        if row.arch not in (None, arch):
            continue
        method_config = METHODS[row.method].config(**row.settings)
        model = attach(build_on_meta(config), method_config, task="count")
        report = model.report(print_table=False)
        trained = sum(p.numel() for p in model.trained_parameters().values())
        note = row.note.format(**_sizes(config, settings=row.settings))
        if trained != report.trainable:  # trained through a reparameterization and folded (prefix tuning's MLP)
            note += f"; trained through {trained - report.head_parameters:,} parameters (an MLP), folded away"
        rows.append(
            ParamsRow(row.label, row.method, report.method_parameters, report.norm_parameters,
                      report.head_parameters, report.total_parameters, row.published, note)
        )
    return rows, config


def _sizes(config, settings: dict) -> dict[str, int]:
    """Numbers a row's note may quote: layers, width (d_model), kv_width (keys per layer and token: smaller
    under grouped-query attention) and prelayer (length x d_model x layers, Hu et al. 2021 section 5.1)."""
    layers = getattr(config, "num_hidden_layers", 0)
    width = getattr(config, "hidden_size", 0)
    heads = getattr(config, "num_attention_heads", 1)
    kv_width = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None)
                                                                          or width // heads)
    return {"layers": layers, "width": width, "kv_width": kv_width,
            "prelayer": settings.get("length", 0) * width * layers}


def format_table(rows: list[ParamsRow], arch: str, config) -> str:
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    total = rows[0].total_parameters if rows else 0
    lines = [
        f"Trainable parameters on {arch} ({config.model_type}, {layers} layers, hidden {width}, "
        f"{total:,} parameters with a 2-class head)",
        "",
        f"{'method':<28}{'method params':>15}{'% of model':>12}{'+ norms':>10}{'+ head':>11}   "
        f"{'published':<15}note",
    ]
    for row in rows:
        percent = f"{row.percent:.4f}%" if row.percent is not None else "-"
        extra = f"{row.extra_parameters:,}" if row.extra_parameters else "-"
        lines.append(
            f"{row.label:<28}{row.method_parameters:>15,}{percent:>12}{extra:>10}{row.head_parameters:>11,}   "
            f"{row.published:<15}{row.note}"
        )
    lines.append("")
    lines.append("'+ head': the task head trained with every method (here a 2-class classification head);")
    lines.append("'% of model' counts the method's own parameters, as the published table does.")
    return "\n".join(lines)
