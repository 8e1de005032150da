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

With `kernels` (`serving/cpu_kernels.py`, the command's default on x86-64 CPUs with AVX-512) the operators between
the products run fused in C: each block's residual add and RMSNorm, the running rows' rotary embedding, cache write
and decode attention, each joining prompt's, and the MLP's silu(gate) * up, while the projections stay modules
(deltas still wrap and hook them per row). Then the logits are the forward's to fp32 / bf16 rounding, not bit for
bit (attention in fp32, a norm's mean summed in another order); one 16-row bf16 step of SmolLM2-135M measured 1.32x
faster than the same step with the operators (27.5 vs 36.3 ms), 1.14x in fp32.

Measured (docs/results/decode_loop_engine.md): one 16-row step alone 1.05-1.07x faster; the decode loops without HTTP
(two loops sharing the GIL, where less Python per step counts twice) 1.19-1.21x the tokens/s on the base model in
bf16. With joining prompts prefilled inside the step (`prompts`, below) instead of in passes of their own: the served
base model 1.16x (bf16, interleaved against the previous main: docs/results/vs_vllm_interleaved.md), the engine 1.18x
(base) and 1.09x (8 mixed LoRAs) in bf16, 1.10x in fp32.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.serving.packed_linear import sibling_outputs
from deltatune.serving.slot_cache import SlotCache, SlotLayer


def _llama_classes() -> tuple[type, ...]:
    from transformers.models.llama import modeling_llama

    return (modeling_llama.LlamaModel, modeling_llama.LlamaDecoderLayer, modeling_llama.LlamaAttention,
            modeling_llama.LlamaMLP)


def _fusable_classes() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The norm and activation modules the fused kernels compute: (norms, activations)."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return (LlamaRMSNorm,), (SiLUActivation, nn.SiLU)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class LlamaDecodeStep:
    """`step(input_ids (B, 1), attention_mask (B, L), position_ids (B, 1), cache)` -> logits (B, 1, vocab) of a
    transformers `LlamaForCausalLM` (SmolLM2, Llama 2/3), as `model(...).logits` computes them; with `prompts`,
    joining requests prefilled in the same step (`__call__`)."""

    def __init__(self, model: nn.Module, task_state=None, kernels=None):
        self.model, self.decoder = model, model.model
        self.task_state = task_state  # a DeltaModel's routing of rows to tasks (`core.component.TaskState`), if any
        self.classes = _llama_classes()
        self.norm_classes, self.activation_classes = _fusable_classes()
        config = self.decoder.config
        attention = self.decoder.layers[0].self_attn
        groups, remainder = divmod(config.num_attention_heads, config.num_key_value_heads)
        # the fused kernels (serving/cpu_kernels.py), where they take this model's shapes
        self.fused = False
        self.kernels = kernels if (kernels is not None and attention.head_dim in (64, 128) and not remainder
                                   and groups <= 8 and config.hidden_size % 16 == 0) else None

    @classmethod
    def for_model(cls, model: nn.Module, task_state=None, kernels=None) -> LlamaDecodeStep | None:
        """The written-out step for a transformers Llama causal LM (`task_state`: the routing of the DeltaModel
        whose base it is; `kernels`: `cpu_kernels.CpuKernels` to run its small operators fused); None for any other
        model (its forward runs)."""
        try:
            from transformers.models.llama.modeling_llama import LlamaForCausalLM
        except ImportError:  # pragma: no cover - transformers without Llama
            return None
        return cls(model, task_state, kernels) if type(model) is LlamaForCausalLM else None

    def applies(self) -> bool:
        """Whether the modules whose forward this step replaces are transformers' own, unhooked, with SDPA."""
        decoder, (model_class, layer_class, attention_class, mlp_class) = self.decoder, self.classes
        if (type(self.model.model) is not model_class or _hooked(self.model) or _hooked(decoder)
                or self.model.config._attn_implementation != "sdpa"
                or torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks):
            return False
        for layer in itertools.islice(decoder.layers, decoder.config.num_hidden_layers):  # not a sliced ModuleList
            attention, mlp = layer.self_attn, layer.mlp
            if (type(layer) is not layer_class or type(attention) is not attention_class or type(mlp) is not mlp_class
                    or _hooked(layer) or _hooked(attention) or _hooked(mlp)):
                return False
        return True

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                 cache, prompts: list[torch.Tensor] = ()) -> torch.Tensor:
        """Logits (B, 1, V) of the B running rows' next tokens. `prompts`: the token ids (L,) of requests joining the
        batch, prefilled INSIDE this step (below); then (B + len(prompts), 1, V), each prompt's last token's after the
        rows'.

        A prompt prefilled on its own reads every weight once more for its few tokens (a pass as long as a decode
        step, or longer, per request that joins). Here its tokens ride along the rows' tokens in every product: all
        the step's tokens are laid out one per row, (B + sum L, 1, hidden), which every projection, norm and delta
        (each works token by token, routed per row) takes as it is; only attention tells them apart: a running row
        attends to its slot of the cache, a prompt causally to its own tokens, and its keys and values go to the
        cache's next free slot, right-aligned at the window's end (`SlotCache.write_joining`). vLLM schedules decode
        and prefill tokens in one batch the same way (chunked prefill, Agrawal et al. 2024, Sarathi-Serve §4.2)."""
        if input_ids.shape[1] != 1:
            raise ValueError(f"the written-out decode step takes one token per row, not {input_ids.shape[1]}; a "
                             f"prompt goes in `prompts` or through the model's own forward")
        decoder, rows = self.decoder, input_ids.shape[0]
        lengths = [len(prompt) for prompt in prompts]
        if prompts:  # every token one row: the running rows' tokens, then each prompt's, at positions 0..L-1
            input_ids = torch.cat([input_ids[:, 0], *prompts])[:, None]
            position_ids = torch.cat([position_ids[:, 0], *[torch.arange(length, device=position_ids.device)
                                                            for length in lengths]])[:, None]
        hidden = decoder.embed_tokens(input_ids)
        kernels = self._kernels_for(hidden, cache)
        self.fused = kernels is not None  # whether this call ran the fused kernels (the decode loop counts them)
        mask = self._mask(hidden, attention_mask, position_ids, cache, rows, kernels) if rows else None
        cos, sin = decoder.rotary_emb(hidden, position_ids=position_ids)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # apply_rotary_pos_emb's unsqueeze_dim=1
        if kernels is not None:  # the fused attention's angles: every token's, and the rows' (rows, head size)
            cos, sin = (cos, cos[:rows, 0, 0]), (sin, sin[:rows, 0, 0])
        residual, pending = hidden, None  # the residual stream, and a block's output not yet added to it
        for layer in itertools.islice(decoder.layers, decoder.config.num_hidden_layers):  # not a sliced ModuleList
            attention, mlp = layer.self_attn, layer.mlp
            residual, normed = self._add_norm(layer.input_layernorm, residual, pending, kernels)
            attend = self._attention if kernels is None else self._fused_attention
            pending = attention.o_proj(attend(attention, normed, mask, cos, sin, cache, rows, lengths, kernels))
            residual, normed = self._add_norm(layer.post_attention_layernorm, residual, pending, kernels)
            gate, up = sibling_outputs((mlp.gate_proj, mlp.up_proj), normed) or (mlp.gate_proj(normed),
                                                                                   mlp.up_proj(normed))
            pending = mlp.down_proj(self._activation(mlp, gate, up, kernels))
        if prompts:  # the rows' tokens and each prompt's last: the tokens whose next token is sampled
            ends = torch.tensor(lengths, device=hidden.device).cumsum(0) + rows - 1
            kept = torch.cat([torch.arange(rows, device=hidden.device), ends])
            residual, pending = residual[kept], pending[kept]
            state = self.task_state
            if state is not None and state.per_example is not None:  # the final norm's and head's deltas: per kept row
                state.per_example = [state.per_example[index] for index in kept.tolist()]
        return self.model.lm_head(self._add_norm(decoder.norm, residual, pending, kernels)[1])

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache, rows: int,
              kernels) -> torch.Tensor | None:
        """The running rows' attention mask: transformers' own (`create_causal_mask`), made additive once per step
        instead of by SDPA in every layer; for the fused kernels, the same from the padding alone (each row's one new
        token attends every real position), additive fp32 (rows, positions). None where no row is padded."""
        from transformers.masking_utils import create_causal_mask

        if kernels is not None:
            if attention_mask is None or bool(attention_mask.all()):
                return None
            return torch.zeros(attention_mask.shape, dtype=torch.float32, device=attention_mask.device).masked_fill_(
                attention_mask == 0, float("-inf"))
        mask = create_causal_mask(config=self.decoder.config, inputs_embeds=hidden[:rows],
                                  attention_mask=attention_mask, cache=cache, position_ids=position_ids[:rows])
        if mask is not None and mask.dtype == torch.bool:  # as SDPA turns a boolean mask into an additive one
            mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill_(
                mask.logical_not(), float("-inf"))
        return mask

    def _kernels_for(self, hidden: torch.Tensor, cache):
        """The fused kernels where they run this step: built, taking this model's shapes and dtype, over a
        `SlotCache` (whose window they write into)."""
        kernels = self.kernels
        return kernels if kernels is not None and isinstance(cache, SlotCache) and kernels.takes(hidden) else None

    def _add_norm(self, norm: nn.Module, residual: torch.Tensor, block_output: torch.Tensor | None,
                  kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """(residual + block_output, norm(residual + block_output)): one fused kernel for transformers' own
        RMSNorm, unhooked (a delta's norm runs as its module)."""
        if kernels is not None and type(norm) in self.norm_classes and not _hooked(norm):
            fused = kernels.add_rms_norm(residual, block_output, norm.weight, norm.variance_epsilon)
            if fused is not None:
                return fused
        if block_output is not None:
            residual = residual + block_output
        return residual, norm(residual)

    def _activation(self, mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, kernels) -> torch.Tensor:
        """`LlamaMLP`'s act_fn(gate) * up: one fused kernel for SiLU, unhooked."""
        activation = mlp.act_fn
        if kernels is not None and type(activation) in self.activation_classes and not _hooked(activation):
            fused = kernels.silu_mul(gate, up)
            if fused is not None:
                return fused
        return activation(gate) * up

    def empty_cache(self, slots: int, capacity: int = 256):
        """A `SlotCache` of `slots` empty rows for this model (its layers, key/value heads, head size, dtype)."""
        config = self.decoder.config
        like = self.decoder.embed_tokens.weight.new_empty(  # (rows, kv heads, positions, head size)
            1, config.num_key_value_heads, 1, self.decoder.layers[0].self_attn.head_dim)
        return SlotCache([SlotLayer(like, slots, capacity) for _ in range(config.num_hidden_layers)])

    @staticmethod
    def _attention(attention: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                   sin: torch.Tensor, cache, rows: int, lengths: list[int], kernels=None) -> torch.Tensor:
        """`LlamaAttention.forward` up to o_proj, with `sdpa_attention_forward`'s one-token paths for the `rows`
        running rows; then each joining prompt (`lengths`) causally over its own tokens, its keys and values written
        to the cache."""
        shape = (hidden.shape[0], 1, -1, attention.head_dim)
        query, key, value = (states.view(shape).transpose(1, 2) for states in _projections(attention, hidden))
        query, key = _rotated(query, cos, sin), _rotated(key, cos, sin)
        outputs = []
        if rows:
            outputs.append(_decode_attention(attention, query[:rows], key[:rows], value[:rows], mask, cache))
        outputs += _prompts_attention(attention, query[rows:], key[rows:], value[rows:], cache, rows, lengths)
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)  # (tokens, heads, 1, d)
        return output.transpose(1, 2).reshape(hidden.shape[0], 1, -1).contiguous()

    @staticmethod
    def _fused_attention(attention: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                         sin: torch.Tensor, cache, rows: int, lengths: list[int], kernels) -> torch.Tensor:
        """`_attention` with the running rows' rotary embedding, cache write and attention in one fused kernel
        (`mask`: its fp32 (rows, positions) form; `cos`, `sin`: each (every token's, the rows' (rows, d))), and each
        joining prompt's in another (`prefill_attend`)."""
        (cos, rows_cos), (sin, rows_sin) = cos, sin
        tokens, dim = hidden.shape[0], attention.head_dim
        query, key, value = (states.view(tokens, -1, dim) for states in _projections(attention, hidden))
        outputs = []
        if rows:
            keys, values = cache.layers[attention.layer_idx].extend(1)
            output = kernels.rope_attend(query[:rows], key[:rows], value[:rows], rows_cos, rows_sin, keys, values,
                                         mask, attention.scaling)
            if output is None:  # a delta's projection of another dtype or layout: the operators, as `_attention`
                cache.layers[attention.layer_idx].crop(1)
                row_query, row_key = (_rotated(states[:rows, :, None], cos[:rows], sin[:rows]) for states in (query,
                                                                                                             key))
                output = _decode_attention(attention, row_query, row_key, value[:rows, :, None],
                                           None if mask is None else mask[:, None, None].to(row_query.dtype), cache)
                output = output.transpose(1, 2)
            outputs.append(output.reshape(rows, 1, -1))
        start = rows
        for slot, length in enumerate(lengths, start=rows):  # each joining prompt: its tokens start .. end - 1
            end = start + length
            output = kernels.prefill_attend(query[start:end], key[start:end], value[start:end], cos[start:end, 0, 0],
                                            sin[start:end, 0, 0],
                                            *cache.joining_columns(attention.layer_idx, slot, length),
                                            attention.scaling)
            if output is None:  # as `_attention`: (L, heads, 1, d), rotated
                prompt_query, prompt_key = (_rotated(states[start:end, :, None], cos[start:end], sin[start:end])
                                            for states in (query, key))
                output = _prompts_attention(attention, prompt_query, prompt_key, value[start:end, :, None], cache,
                                            slot, [length])[0].transpose(1, 2)
            outputs.append(output.reshape(length, 1, -1))
            start = end
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _projections(attention: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q_proj, k_proj and v_proj of `hidden`: one product where they are a packed sibling group as they are."""
    return sibling_outputs((attention.q_proj, attention.k_proj, attention.v_proj), hidden) or (
        attention.q_proj(hidden), attention.k_proj(hidden), attention.v_proj(hidden))


def _prompts_attention(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cache,
                       first_slot: int, lengths: list[int]) -> list[torch.Tensor]:
    """Each joining prompt's tokens (`lengths`, one after another in query, key, value: (tokens, heads, 1, d),
    rotated) causally over its own tokens, as the forward's prefill attends; its keys and values written to the
    cache's slot `first_slot`, the next, ... Outputs (L, heads, 1, d) per prompt."""
    outputs, start = [], 0
    for slot, length in enumerate(lengths, start=first_slot):  # (L, heads, 1, d) -> (1, heads, L, d) and back
        prompt_keys, prompt_values = key[start : start + length], value[start : start + length]
        cache.write_joining(attention.layer_idx, slot, prompt_keys.transpose(0, 2)[0], prompt_values.transpose(0, 2)[0])
        output = F.scaled_dot_product_attention(
            query[start : start + length].transpose(0, 2), prompt_keys.transpose(0, 2), prompt_values.transpose(0, 2),
            dropout_p=0.0, scale=attention.scaling, is_causal=True, enable_gqa=attention.num_key_value_groups > 1)
        outputs.append(output.transpose(0, 2))
        start += length
    return outputs


def _decode_attention(attention: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, cache) -> torch.Tensor:
    """One new token per row over the cache, as `sdpa_attention_forward` runs it: (B, heads, 1, d)."""
    batch, length = query.shape[0], 1
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
    return output.reshape(output.shape[0], -1, length, value.shape[-1])


def _rotated(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding as transformers' `apply_rotary_pos_emb` computes it (RoFormer, Su et al. 2021 §3.4.2):
    the same operators, so the same rounding."""
    return (states * cos) + (_rotate_half(states) * sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
