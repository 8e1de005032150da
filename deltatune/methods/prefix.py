"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation").

Every attention layer l gets P trainable key and value vectors, P_k^l and P_v^l (P x d_kv each), that
every input token attends to as if P extra tokens stood before the input (section 4.1):

    head = softmax(q [P_k^l ; K]^T / sqrt(d)) [P_v^l ; V]          K, V: the input's own keys and values

The prefix is never an input token: it is not embedded, has no hidden state of its own and is never
predicted; only attention reads it. The model stays frozen; the prefixes (and the task head) train.

Reparameterization (section 4.3): optimizing the prefixes directly "leads to unstable optimization",
so they are computed by an MLP from a smaller matrix, and only that MLP's output is kept after training:

    [P_k ; P_v] = W_2 tanh(W_1 E + b_1) + b_2      E: P x d_model,  W_1: hidden x d_model,
                                                    W_2: (layers * 2 * d_kv) x hidden

The delta file holds the folded prefixes only (layers x 2 x P x d_kv numbers): `task_parameters` is
what is saved, `trained_parameters` what the optimizer updates (E, W_1, b_1, W_2, b_2 while the MLP is
there). A loaded delta has no MLP.

How each architecture gets its prefix: the prefixes are the model's own key/value cache before the
first token (transformers' `DynamicCache`, as Li & Liang's GPT-2 code passes `past_key_values`, and as
Hugging Face peft's PREFIX_TUNING does), so positions count on from P (a decoder's input starts at
position P) and the attention mask gets P ones in front. BERT/RoBERTa self-attention and the decoders
(GPT-2, Llama: one prefix per key/value head under grouped-query attention) read the cache directly.
T5: the decoder's self-attention reads the cache too; its encoder drops caches, so each encoder
self-attention is handed its prefix by a forward pre-hook while deltatune runs the encoder. T5's
cross-attention has no prefix (Li & Liang add a third set there for BART; the encoder prefix already
shapes what cross-attention reads).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.core.architectures import (
    PREFIX_ARCHITECTURES,
    ROBERTA_LIKE,
    attention_shape,
    model_type,
    prefix_kind,
    top_blocks,
)
from deltatune.core.component import DeltaComponent, TaskState, root_component
from deltatune.errors import MergeError, PrefixError
from deltatune.methods.prompt import position_limit


@dataclass
class PrefixTuning:
    """Prefix-tuning settings (Li & Liang 2021)."""

    length: int = field(default=10, metadata={"help": "prefix length P (Li & Liang 2021: 10 for table-to-text)"})
    reparameterize: bool = field(
        default=True, metadata={"help": "train the prefixes through an MLP (section 4.3); the delta keeps its output"}
    )
    hidden: int = field(default=512, metadata={"help": "width of the reparameterization MLP (section 4.3)"})

    def __post_init__(self) -> None:
        if self.length < 1:
            raise PrefixError(f"prefix length must be >= 1, got {self.length}; use e.g. length=10")
        if self.hidden < 1:
            raise PrefixError(f"prefix MLP width hidden must be >= 1, got {self.hidden}")


@dataclass(frozen=True)
class AttentionSites:
    """The self-attention layers that get a prefix: encoder layers first, then decoder layers."""

    encoder_layers: int  # T5's encoder; 0 elsewhere
    layers: int  # all of them (the cache's layers for BERT/GPT-2/Llama; encoder + decoder for T5)
    kv_heads: int
    head_dim: int
    width: int  # d_model, the width of the reparameterization's input


def attention_sites(model: nn.Module) -> AttentionSites:
    kind = prefix_kind(model)
    if kind is None:
        raise PrefixError(f"prefix tuning does not support {type(model).__name__} (model type {model_type(model)!r}): "
                          f"it is in no table ({sorted(PREFIX_ARCHITECTURES)}) and its forward takes no key/value "
                          f"cache (past_key_values) to hand the prefixes in; use prompt tuning, which needs only "
                          f"input embeddings")
    config = model.config
    if kind == "encoder-decoder":  # T5
        return AttentionSites(config.num_layers, config.num_layers + config.num_decoder_layers, config.num_heads,
                              config.d_kv, config.d_model)
    _, kv_heads, head_dim = attention_shape(config)  # one prefix per key/value head (grouped-query attention)
    return AttentionSites(0, len(top_blocks(model)[1]), kv_heads, head_dim, config.hidden_size)


class PrefixMLP(nn.Module):
    """Li & Liang's reparameterization (section 4.3): E (P x d) -> Linear -> tanh -> Linear -> every prefix."""

    def __init__(self, length: int, sites: AttentionSites, hidden: int, reference: torch.Tensor):
        super().__init__()
        options = dict(dtype=reference.dtype, device=reference.device)
        self.sites = sites
        self.embedding = nn.Parameter(torch.randn(length, sites.width, **options))
        self.down = nn.Linear(sites.width, hidden, **options)
        self.up = nn.Linear(hidden, sites.layers * 2 * sites.kv_heads * sites.head_dim, **options)

    def forward(self) -> torch.Tensor:
        s = self.sites
        flat = self.up(torch.tanh(self.down(self.embedding)))  # (P, layers * 2 * kv_heads * head_dim)
        # (P, layers, 2, kv_heads, head_dim) -> (layers, 2, kv_heads, P, head_dim): the cache's layout
        return flat.view(-1, s.layers, 2, s.kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)


class PrefixKeyValues(DeltaComponent):
    """Every task's prefixes, handed to the model's attention as a key/value cache that is there before
    the first token."""

    root_level = True  # delta key: "prefix_key_values"
    input_order = 1  # after components that rewrite the input sequence (prompt tuning): we extend its mask

    def __init__(self, model: nn.Module, state: TaskState):
        super().__init__(state)
        self.__dict__["model"] = model  # the base model (our parent, not a submodule)
        self.sites = attention_sites(model)
        self.kind = prefix_kind(model)
        self.limit = position_limit(model.config)
        self.prefix_key_values = nn.ParameterDict()  # task -> (layers, 2, kv_heads, P, head_dim)
        self.reparameterization = nn.ModuleDict()  # task -> PrefixMLP, while it trains through one
        self.__dict__["_encoder_prefix"] = None  # T5: (cache, prefix mask) while deltatune runs the encoder
        self.__dict__["_hooks"] = []
        if self.kind == "encoder-decoder":
            for block in model.get_encoder().block:  # a bound method, so that a deepcopy calls its own copy
                hook = block.layer[0].SelfAttention.register_forward_pre_hook(self._encoder_hook, with_kwargs=True)
                self._hooks.append(hook)

    @property
    def tasks(self) -> list[str]:
        return list(self.prefix_key_values.keys())

    @property
    def reserved_positions(self) -> int:
        """Positions the prefixes take from the model's context (read by data.max_model_length)."""
        if self.limit is None:
            return 0
        return max((p.shape[3] for p in self.prefix_key_values.values()), default=0)

    def add_task(self, task: str, config: PrefixTuning) -> None:
        reference = next(p for p in self.model.parameters() if p.is_floating_point())
        mlp = PrefixMLP(config.length, self.sites, config.hidden, reference)
        with torch.no_grad():  # reparameterize=False starts where the MLP would start
            self.prefix_key_values[task] = nn.Parameter(mlp().contiguous())
        if config.reparameterize:
            self.reparameterization[task] = mlp

    def remove_task(self, task: str) -> None:
        del self.prefix_key_values[task]
        if task in self.reparameterization:
            del self.reparameterization[task]

    def fold(self, task: str) -> None:
        """Write the MLP's output into the task's prefixes (what the delta holds)."""
        if task in self.reparameterization:
            with torch.no_grad():
                self.prefix_key_values[task].copy_(self.reparameterization[task]())

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        self.fold(task)
        return {"prefix_key_values": self.prefix_key_values[task]}

    def trained_parameters(self, task: str) -> dict[str, nn.Parameter]:
        if task not in self.reparameterization:
            return self.task_parameters(task)
        return {f"prefix_mlp.{name}": p for name, p in self.reparameterization[task].named_parameters()}

    def on_load(self, task: str) -> None:
        """A delta was read into the folded prefixes: they, not a fresh MLP, are the task now."""
        if task in self.reparameterization:
            del self.reparameterization[task]

    def prefixes(self, task: str) -> torch.Tensor:
        """(layers, 2, kv_heads, P, head_dim): the MLP's output while it trains, else the folded prefixes."""
        if task in self.reparameterization:
            mlp = self.reparameterization[task]
            return self.stacked(f"mlp:{task}", list(mlp.parameters()), mlp)
        return self.prefix_key_values[task]

    # ---- the forward pass -----------------------------------------------------------------------------
    def _check_fits(self, length: int, prefix: int) -> None:
        if self.limit is not None and prefix + length > self.limit:
            raise PrefixError(f"an input of {length} tokens does not fit: the model has {self.limit} positions and "
                              f"the prefix takes {prefix} of them; shorten inputs to {self.limit - prefix} tokens "
                              f"or use a shorter prefix")

    def _check_call(self, inputs: dict) -> None:
        if isinstance(inputs.get("attention_mask"), torch.Tensor) and inputs["attention_mask"].dim() != 2:
            raise PrefixError("prefix tuning extends 2D attention masks (batch x tokens); pass a 2D attention_mask")
        if inputs.get("cache") is not None or inputs.get("past_key_values") is not None:
            raise PrefixError("prefix tuning hands the model its key/value cache (the prefixes); do not pass "
                              "cache/past_key_values (generate with model.generate, which starts from the prefixes)")
        if self.model.training and any(getattr(m, "gradient_checkpointing", False) is True
                                       for m in self.model.modules()):
            # transformers' checkpointed layers drop the cache (GradientCheckpointingLayer; GPT-2 even without grad)
            raise PrefixError("prefix tuning cannot train with gradient checkpointing: checkpointed layers drop the "
                              "key/value cache that carries the prefixes; train without --grad-checkpointing")

    def prepare_inputs(self, inputs: dict) -> dict:
        """Hand the active task's prefixes (or, in a mixed batch, each example's) to the model."""
        if self.task_state.per_example is not None:
            present = [t for t in dict.fromkeys(self.task_state.per_example) if t in self.prefix_key_values]
            if not present:
                return inputs
            prefix, valid = self._mixed_prefixes(inputs)
        else:
            task = self.active_task
            if task not in self.prefix_key_values:
                return inputs
            prefix, valid = self.prefixes(task), None
        inputs = dict(inputs)
        self._check_call(inputs)
        if self.kind == "encoder-decoder":
            return self._prepare_encoder_decoder(inputs, prefix, valid)
        tokens = _tokens(inputs)
        batch, length = tokens.shape[:2]
        self._check_fits(length, prefix.shape[-2])
        mask = inputs.get("attention_mask")
        mask = torch.ones(batch, length, dtype=torch.long, device=tokens.device) if mask is None else mask
        prefix_mask = mask.new_ones(batch, prefix.shape[-2]) if valid is None else valid.to(mask.dtype)
        inputs["attention_mask"] = torch.cat([prefix_mask, mask], dim=1)
        inputs["cache"] = self._cache(prefix, batch, range(self.sites.layers))
        if valid is not None:  # rows with shorter prefixes count their positions from their own length
            inputs["position_ids"] = self._mixed_positions(inputs, mask, valid.sum(1, keepdim=True))
        return inputs

    def _cache(self, prefix: torch.Tensor, batch: int, layers: range):
        """A DynamicCache holding `prefix` (layers, 2, H, P, hd) or (B, layers, 2, H, P, hd) for `layers`."""
        from transformers import DynamicCache

        dtype = next(p for p in self.model.parameters() if p.is_floating_point()).dtype
        if prefix.dim() == 5:
            prefix = prefix.unsqueeze(0).expand(batch, *prefix.shape)
        cache = DynamicCache()
        for index, layer in enumerate(layers):
            keys, values = prefix[:, layer, 0].to(dtype), prefix[:, layer, 1].to(dtype)  # (B, H, P, hd)
            cache.update(keys, values, index)
        return cache

    def _mixed_positions(self, inputs: dict, mask: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """(B, n) positions of each example as the model numbers them alone after its prefix of `offset`
        (B, 1) tokens (positions given by a component before us, prompt tuning, are moved on by it)."""
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"] + offset
        if model_type(self.model) in ROBERTA_LIKE:  # numbered from padding_idx + 1, padding keeps padding_idx
            pad = self.model.config.pad_token_id
            return ((mask.long().cumsum(-1) + offset) * mask.long() + pad).long()
        return torch.arange(mask.shape[1], device=mask.device)[None] + offset

    def _mixed_prefixes(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, layers, 2, H, P_max, hd) prefixes of the examples' tasks, each pushed to the right end (so that
        T5's relative positions and every mask see it as the example alone does), and (B, P_max) which of
        those slots are real (examples of other tasks: none)."""
        table, lengths = self.stacked("prefix", self._stack_inputs(), self._stack_for_mixed)
        tokens = _tokens(inputs)
        rows = self.example_rows(tokens.shape[0], tokens.device)
        longest = table.shape[-2]
        valid = torch.arange(longest, device=tokens.device)[None] >= longest - lengths.to(tokens.device)[rows, None]
        return table[rows], valid

    def _stack_inputs(self) -> list[torch.Tensor]:
        tensors = list(self.prefix_key_values.values())
        for mlp in self.reparameterization.values():
            tensors += list(mlp.parameters())
        return tensors

    def _stack_for_mixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's prefixes, right-aligned in one zero-padded table (T+1, layers, 2, H, P_max, hd) (last
        row: no prefix), and their lengths (T+1,)."""
        prefixes = [self.prefixes(task) for task in self.tasks]
        longest = max(p.shape[-2] for p in prefixes)
        rows = [nn.functional.pad(p, (0, 0, longest - p.shape[-2], 0)) for p in prefixes]
        table = torch.stack(rows + [torch.zeros_like(rows[0])])
        return table, torch.tensor([p.shape[-2] for p in prefixes] + [0])

    # ---- T5 ---------------------------------------------------------------------------------------
    def _prepare_encoder_decoder(self, inputs: dict, prefix: torch.Tensor, valid: torch.Tensor | None) -> dict:
        """T5: the encoder runs here with its layers' prefixes (its stack drops caches, so the hooks hand each
        self-attention its own), the decoder gets the rest as its self-attention cache."""
        from transformers import DynamicCache, EncoderDecoderCache

        if inputs.get("encoder_outputs") is not None:
            raise PrefixError("prefix tuning runs T5's encoder itself; pass input_ids, not encoder_outputs (on T5 "
                              "prompt-tuning and prefix-tuning examples cannot share a mixed batch)")
        input_ids = inputs.get("input_ids")
        batch = input_ids.shape[0]
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask
        length = prefix.shape[-2]
        prefix_mask = mask.new_ones(batch, length) if valid is None else valid.to(mask.dtype)
        encoder_layers = range(self.sites.encoder_layers)
        self.__dict__["_encoder_prefix"] = (self._cache(prefix, batch, encoder_layers), prefix_mask, {})
        try:
            inputs["encoder_outputs"] = self.model.get_encoder()(
                input_ids=input_ids, attention_mask=mask, inputs_embeds=inputs.pop("inputs_embeds", None),
                return_dict=True)
        finally:
            self.__dict__["_encoder_prefix"] = None
        decoder_layers = range(self.sites.encoder_layers, self.sites.layers)
        inputs["cache"] = EncoderDecoderCache(self._cache(prefix, batch, decoder_layers), DynamicCache())
        if valid is not None:  # the decoder's mask over [prefix ; its own tokens]
            decoder_ids = inputs.get("decoder_input_ids", input_ids)
            decoder_mask = inputs.get("decoder_attention_mask")
            decoder_mask = torch.ones_like(decoder_ids) if decoder_mask is None else decoder_mask
            inputs["decoder_attention_mask"] = torch.cat([prefix_mask, decoder_mask], dim=1)
        return inputs

    def _encoder_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        """Before each T5 encoder self-attention: its prefixes as the cache (indexed by its layer_idx), and
        the mask extended over them."""
        state = self.__dict__["_encoder_prefix"]
        if state is None:
            return None
        cache, prefix_mask, extended = state
        kwargs = dict(kwargs, cache=cache)
        mask = kwargs.get("mask")
        if id(mask) not in extended:  # the same mask reaches every layer: extend it once
            extended[id(mask)] = _extend_mask(mask, prefix_mask, args[0] if args else kwargs["hidden_states"])
        kwargs["mask"] = extended[id(mask)]
        return args, kwargs

    # ---- generation -------------------------------------------------------------------------------
    def generate(self, model: nn.Module, inputs: torch.Tensor | None = None, **kwargs):
        """`model.generate` whose key/value cache starts from the active task's prefixes. A decoder returns
        input_ids + new tokens, as usual; positions count on from the prefix's length, as in forward."""
        input_ids = kwargs.pop("input_ids", inputs)
        mask = kwargs.pop("attention_mask", None)
        prepared = self.prepare_inputs({"input_ids": input_ids, "attention_mask": mask})
        if self.kind == "encoder-decoder":
            prepared.pop("input_ids")  # the encoder ran: generate starts from its output
        else:  # the new tokens need positions too
            new_tokens = kwargs.get("max_new_tokens") or 0
            self._check_fits(input_ids.shape[1] + new_tokens, self.prefixes(self.active_task).shape[-2])
        return model.generate(**prepared, **kwargs)

    def merge(self, task: str) -> None:
        raise MergeError("prefixes are attended to, not a weight change; prefix tuning cannot be merged into "
                         "the base weights")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> None:
        for hook in self._hooks:
            hook.remove()
        return None

    def extra_repr(self) -> str:
        return f"layers={self.sites.layers}, kv_heads={self.sites.kv_heads}, tasks={self.tasks}"


def _tokens(inputs: dict) -> torch.Tensor:
    tokens = inputs.get("input_ids")
    tokens = inputs.get("inputs_embeds") if tokens is None else tokens
    if tokens is None:
        raise PrefixError("prefix tuning needs input_ids=... (or inputs_embeds=...) as keyword arguments")
    return tokens


def _extend_mask(mask: torch.Tensor | None, prefix_mask: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The encoder's attention mask (None, bool or additive, (B, 1, q, n)) with the prefix's P columns in
    front, as an additive float mask (B, 1, q, P + n): 0 where attended, the dtype's minimum elsewhere."""
    batch, length = hidden.shape[:2]
    smallest = torch.finfo(hidden.dtype).min
    if mask is None:
        mask = hidden.new_zeros(batch, 1, length, length)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~mask, smallest)
    prefix = torch.where(prefix_mask.bool(), 0.0, smallest).to(hidden.dtype)[:, None, None, :]
    return torch.cat([prefix.expand(mask.shape[0], 1, mask.shape[2], -1), mask.to(hidden.dtype)], dim=-1)


def inject(model: nn.Module, config: PrefixTuning, task: str, state: TaskState, exclude: list[str]) -> None:
    """One PrefixKeyValues at the model's root (once) holds every task's prefixes."""
    root_component(model, "deltatune_prefix", lambda: PrefixKeyValues(model, state)).add_task(task, config)
