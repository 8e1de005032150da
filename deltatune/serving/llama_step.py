"""A Llama-style decoder's decode step written out: one new token per row over the decode loop's slot cache.

The decode loop's step used to be the model's own forward (`LlamaForCausalLM.forward`). For a one-token step that
forward's machinery weighs once the matrix products are fast: on a Xeon with AMX, SmolLM2-135M in bf16 with every
linear layer prepacked, the products are ~27% of a decode loop's samples (py-spy); the rest is Python (per-layer
decorators and keyword plumbing, the attention dispatcher) and small operators. vLLM writes its models' forwards for
serving (`vllm/model_executor/models/llama.py`) for the same reason.

`LlamaDecodeStep` runs the SAME operators in the same order as transformers' eager forward with SDPA attention
(`LlamaModel.forward`, `LlamaDecoderLayer.forward`, `LlamaAttention.forward`, `sdpa_attention_forward`,
`LlamaMLP.forward`), so its logits are bit-identical to the forward's: the mask from transformers'
`create_causal_mask`, the embedding, rotary embedding, norms and every projection called as the model's own modules,
so a delta that wraps a projection (LoRA, DoRA) or hooks one (adapters on o_proj / down_proj, (IA)³, BitFit) still
applies, per row. What it skips is the code between them. It applies while the modules whose forward it replaces
(the decoder, each layer, its attention and MLP) are transformers' own classes with no hooks and the attention is
SDPA (`applies`, checked every step); otherwise the model's forward runs.

Measured (docs/results/decode_loop_engine.md): one 16-row step alone 1.05-1.07x faster; the decode loops without HTTP
(two loops sharing the GIL, where less Python per step counts twice) 1.19-1.21x the tokens/s on the base model in
bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _llama_classes() -> tuple[type, ...]:
    from transformers.models.llama import modeling_llama

    return (modeling_llama.LlamaModel, modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaAttention,
            modeling_llama.LlamaMLP)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LlamaDecodeStep:
    """`step(input_ids (B, 1), attention_mask (B, L), position_ids (B, 1), cache)` -> logits (B, 1, vocab) of a
    transformers `LlamaForCausalLM` (SmolLM2, Llama 2/3), as `model(...).logits` computes them."""

    def __init__(self, model: nn.Module):
        self.model, self.decoder = model, model.model
        self.classes = _llama_classes()

    @classmethod
    def for_model(cls, model: nn.Module) -> LlamaDecodeStep | None:
        """The written-out step for a transformers Llama causal LM; None for any other model (its forward runs)."""
        try:
            from transformers.models.llama.modeling_llama import LlamaForCausalLM
        except ImportError:  # pragma: no cover - transformers without Llama
            return None
        return cls(model) if type(model) is LlamaForCausalLM else None

    def applies(self) -> bool:
        """Whether the modules whose forward this step replaces are transformers' own, unhooked, with SDPA."""
        decoder, (model_class, layer_class, attention_class, mlp_class) = self.decoder, self.classes
        if (type(self.model.model) is not model_class or _hooked(self.model) or _hooked(decoder)
                or self.model.config._attn_implementation != "sdpa"
                or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks):
            return False
        for layer in decoder.layers[: decoder.config.num_hidden_layers]:
            attention, mlp = layer.self_attn, layer.mlp
            if (type(layer) is not layer_class or type(attention) is not attention_class or type(mlp) is not mlp_class
                    or _hooked(layer) or _hooked(attention) or _hooked(mlp)):
                return False
        return True

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        if input_ids.shape[1] != 1:
            raise ValueError(f"the written-out decode step takes one token per row, not {input_ids.shape[1]}; a "
                             f"prompt goes through the model's own forward")
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)
        mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=cache, position_ids=position_ids)
        cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # apply_rotary_pos_emb's unsqueeze_dim=1
        for layer in decoder.layers[: decoder.config.num_hidden_layers]:
            attention = layer.self_attn
            hidden = hidden + attention.o_proj(self._attention(attention, layer.input_layernorm(hidden), mask, cos,
                                                               sin, cache))
            mlp = layer.mlp
            normed = layer.post_attention_layernorm(hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))
        return self.model.lm_head(decoder.norm(hidden))

    @staticmethod
    def _attention(attention: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, cache) -> torch.Tensor:
        """`LlamaAttention.forward` up to o_proj, with `sdpa_attention_forward`'s one-token paths."""
        batch, length = hidden.shape[:2]
        shape = (batch, length, -1, attention.head_dim)
        query = attention.q_proj(hidden).view(shape).transpose(1, 2)
        key = attention.k_proj(hidden).view(shape).transpose(1, 2)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        query = (query * cos) + (_rotate_half(query) * sin)
        key = (key * cos) + (_rotate_half(key) * sin)
        key, value = cache.update(key, value, attention.layer_idx)
        groups, options = attention.num_key_value_groups, {}
        if groups > 1:  # grouped-query attention, as sdpa_attention_forward runs it for one query token
            if mask is None and key.shape[-1] == value.shape[-1] <= 256:
                options["enable_gqa"] = True
            else:  # pack_gqa: (B, heads, 1, d) -> (B, kv heads, groups, d); a (B, 1, ...) mask as is
                query = query.reshape(batch, query.shape[1] // groups, groups, query.shape[-1])
                if mask is not None and mask.shape[1] != 1:
                    mask = mask.reshape(batch, mask.shape[1] // groups, groups, mask.shape[-1])
        output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0,
                                                scale=attention.scaling, is_causal=False, **options)
        output = output.reshape(output.shape[0], -1, length, value.shape[-1]).transpose(1, 2).contiguous()
        return output.reshape(batch, length, -1).contiguous()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
