"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

P trainable virtual-token embeddings P_e (P x d, d = the hidden size) join the embedded input X_e
(n x d); the model, its embedding matrix included, stays frozen; only P_e and the task head train
(section 2):

    [P_e ; X_e]  ->  frozen transformer            (P + n) x d,  attention mask extended by P ones

Where the prompt goes: decoders (GPT-2, Llama) and T5's encoder get it in front, as in the paper;
BERT-style encoders, whose classification head reads the first token ([CLS]), get it right after that
token, so the head still reads [CLS]. Labels of causal LMs get -100 at the prompt positions (no loss).

Initialisation (section 3.2): "random" (normal, with the embedding matrix's standard deviation),
"vocab" (embeddings of random vocabulary tokens) or "text" (embeddings of a text's tokens, repeated or
cut to P). A config holds token ids, not a tokenizer: `PromptTuning.from_text(text, tokenizer)` or
`init_token_ids=[...]`; the ids are saved with the delta.

The cost is real: the prompt occupies P of the model's positions, so an input longer
than max_position_embeddings - P is cut to fit, with a warning (`truncate=False`: an error instead).
A prompt is not a weight change: it cannot be merged.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deltatune.core.architectures import ROBERTA_LIKE, model_type
from deltatune.core.component import DeltaComponent, TaskState, root_component
from deltatune.errors import DeltaTuneError, MergeError

INITS = ("random", "text", "vocab")
IGNORE_INDEX = -100  # labels the loss skips


@dataclass
class PromptTuning:
    """Prompt-tuning settings (Lester et al. 2021)."""

    length: int = field(default=20, metadata={"help": "number P of virtual tokens (paper section 3.2)"})
    init: str = field(
        default="random", metadata={"help": "random | text | vocab (paper section 3.2)", "choices": list(INITS)}
    )
    init_text: str | None = field(default=None, metadata={"help": "the text of init='text' (for the record)"})
    init_token_ids: list[int] | None = field(
        default=None, metadata={"help": "token ids of init_text; set by from_text(text, tokenizer)"}
    )
    truncate: bool = field(
        default=True, metadata={"help": "cut inputs longer than the positions left by the prompt (else error)"}
    )

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"prompt length must be >= 1, got {self.length}")
        if self.init not in INITS:
            raise ValueError(f"unknown prompt init {self.init!r}; choose one of {INITS}")
        if self.init == "text" and self.init_text is None and not self.init_token_ids:
            raise ValueError("init='text' needs a text: PromptTuning.from_text(text, tokenizer) or init_token_ids")

    def tokenize(self, tokenizer) -> None:
        """init='text' given as text alone (`-o init=text -o init_text=...`): its token ids, from `tokenizer`."""
        if self.init == "text" and self.init_text is not None:
            self.init_token_ids = tokenizer(self.init_text, add_special_tokens=False)["input_ids"]

    @classmethod
    def from_text(cls, text: str, tokenizer, **options) -> PromptTuning:
        """Prompt tuning initialised from the embeddings of `text`'s tokens."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return cls(init="text", init_text=text, init_token_ids=list(ids), **options)


def prompt_layout(model: nn.Module) -> str:
    """Where the prompt goes: "encoder" (in front of an encoder-decoder's encoder input), "after_first"
    (after [CLS] of a BERT-style encoder: a model type with a masked-LM head) or "prepend" (decoders)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder"
    return "after_first" if model_type(model) in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "prepend"


def position_limit(config) -> int | None:
    """How many tokens the model can number (None: relative positions, no limit)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and limit <= 0:  # XLNet's -1: relative positions, no limit
        return None
    if limit and getattr(config, "model_type", None) in ROBERTA_LIKE:
        limit -= (config.pad_token_id or 0) + 1
    return limit


class PromptEmbedding(DeltaComponent):
    """Per-task prompts; `prepare_inputs` rewrites a forward call's keyword arguments to carry them."""

    root_level = True  # delta key: "prompt_embeddings"

    def __init__(self, model: nn.Module, state: TaskState):
        super().__init__(state)
        self.prompt_embeddings = nn.ParameterDict()  # task -> (P, d)
        self.truncate: dict[str, bool] = {}
        self.__dict__["model"] = model  # the base model (not a submodule: it is our parent)
        self.layout = prompt_layout(model)
        self.limit = position_limit(model.config)
        # GPT-2/Llama classification pools position -1 when given inputs_embeds (and logs that it "will not
        # detect padding tokens"): moving the padding to the left makes -1 every example's last token
        self.pools_last_token = self.layout == "prepend" and type(model).__name__.endswith("ForSequenceClassification")

    @property
    def tasks(self) -> list[str]:
        return list(self.prompt_embeddings.keys())

    @property
    def reserved_positions(self) -> int:
        """Positions the prompts take from the model's context (read by data.max_model_length)."""
        return max((p.shape[0] for p in self.prompt_embeddings.values()), default=0)

    def add_task(self, task: str, config: PromptTuning) -> None:
        embedding = self.model.get_input_embeddings().weight.detach()  # (V, d)
        vocab_size, width = embedding.shape
        if config.init == "random":
            values = torch.randn(config.length, width, dtype=embedding.dtype, device=embedding.device)
            values = values * embedding.float().std().to(embedding.dtype)
        else:
            if config.init == "vocab":
                ids = torch.randint(0, vocab_size, (config.length,)).tolist()
            elif not config.init_token_ids:
                raise DeltaTuneError("init='text' needs token ids: use PromptTuning.from_text(text, tokenizer) "
                                     "or pass init_token_ids=tokenizer(text, add_special_tokens=False).input_ids")
            else:  # the text's tokens, repeated or cut to the prompt's length
                repeats = math.ceil(config.length / len(config.init_token_ids))
                ids = (list(config.init_token_ids) * repeats)[: config.length]
                if max(ids) >= vocab_size or min(ids) < 0:
                    raise DeltaTuneError(f"init_token_ids must lie in [0, {vocab_size}), got {min(ids)}..{max(ids)}")
            values = embedding[torch.tensor(ids, device=embedding.device)]
        self.prompt_embeddings[task] = nn.Parameter(values.clone())
        self.truncate[task] = config.truncate

    def remove_task(self, task: str) -> None:
        del self.prompt_embeddings[task], self.truncate[task]

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.prompt_embeddings[task]}

    def _fit(self, task: str, length: int, reserve: int = 0) -> int:
        """How many input tokens fit beside the prompt (and `reserve` new tokens); warns or raises if cut."""
        prompt = self.prompt_embeddings[task].shape[0]
        if self.limit is None or prompt + length + reserve <= self.limit:
            return length
        room = self.limit - prompt - reserve
        problem = (f"an input of {length} tokens does not fit: the model has {self.limit} positions and the "
                   f"prompt takes {prompt} of them" + (f" (plus {reserve} new tokens)" if reserve else ""))
        if not self.truncate[task] or room < 1:
            raise DeltaTuneError(f"{problem}; shorten inputs to {max(room, 0)} tokens or use a shorter prompt")
        warnings.warn(f"{problem} (prompt tuning's drawback); keeping {room} tokens", stacklevel=4)
        return room

    def _embedded_inputs(self, inputs: dict) -> tuple[dict, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(a copy of the kwargs without input_ids/inputs_embeds, input_ids, embeddings (B, n, d), mask)."""
        inputs = dict(inputs)
        if inputs.get("position_ids") is not None:
            raise DeltaTuneError("prompt tuning numbers positions itself; do not pass position_ids")
        input_ids, embeds = inputs.pop("input_ids", None), inputs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise DeltaTuneError("prompt tuning needs input_ids=... (or inputs_embeds=...) as keyword arguments")
            embeds = self.model.get_input_embeddings()(input_ids)  # (B, n, d)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return inputs, input_ids, embeds, mask

    def prepare_inputs(self, inputs: dict) -> dict:
        if self.task_state.per_example is not None:
            return self._prepare_mixed(inputs)
        task = self.active_task
        if task not in self.prompt_embeddings:
            return inputs
        inputs, input_ids, embeds, mask = self._embedded_inputs(inputs)
        batch, length = embeds.shape[:2]
        keep = self._fit(task, length)  # keep the first `keep` tokens, as a tokenizer truncates
        per_token = self._per_token(inputs, mask, length)
        fills = {"attention_mask": 1, "token_type_ids": 0, "labels": IGNORE_INDEX}

        prompt = self.prompt_embeddings[task].to(embeds.dtype).expand(batch, -1, -1)  # (B, P, d)
        at = 1 if self.layout == "after_first" else 0
        embeds = torch.cat([embeds[:, :at], prompt, embeds[:, at:keep]], dim=1)  # (B, P + n, d)
        for name, tensor in per_token.items():
            if tensor is not None:
                filler = tensor.new_full((batch, prompt.shape[1]), fills[name])
                inputs[name] = torch.cat([tensor[:, :at], filler, tensor[:, at:keep]], dim=1)
        return self._model_inputs(inputs, input_ids, embeds, list(per_token), renumber=False)

    def _prepare_mixed(self, inputs: dict) -> dict:
        """A mixed-task batch: each example gets its own task's prompt, none for tasks without one.

        Each row is the example's sequence as it would run alone, plus masked padding where its prompt is
        shorter than the batch's longest. Decoders ("prepend") put that padding in front and number positions
        from the first real token, so every example's own tokens sit at the same offsets (as token-level
        logits and labels need); the other layouts put it at the end of the row, so that absolute and
        relative positions (BERT, T5) are exactly those of the example alone."""
        present = [task for task in dict.fromkeys(self.task_state.per_example) if task in self.prompt_embeddings]
        if not present:
            return inputs
        inputs, input_ids, embeds, mask = self._embedded_inputs(inputs)
        batch, length = embeds.shape[:2]
        device = embeds.device
        table, lengths = self.stacked("prompt", list(self.prompt_embeddings.values()), self._stack_for_mixed)
        rows = self.example_rows(batch, device)
        kept = {task: self._fit(task, length) for task in present}  # input tokens each task's prompt leaves
        keep = torch.tensor([kept.get(task, length) for task in self.tasks] + [length], device=device)[rows, None]
        prompt_length = lengths.to(device)[rows, None]  # (B, 1)
        longest = int(prompt_length.max())

        # each output position's source in [the example's n tokens | its task's prompt rows | one padding slot]
        width = table.shape[1]
        padding = length + width
        if self.layout == "prepend":  # [padding, prompt, tokens]
            position = torch.arange(longest + int(keep.max()), device=device)[None]  # (1, L)
            gap = longest - prompt_length
            index = torch.where(position < gap, padding, torch.where(
                position < longest, length + position - gap, torch.where(
                    position < longest + keep, position - longest, padding)))
        else:  # [first token (after_first: [CLS]), prompt, the other tokens, padding]
            first = 1 if self.layout == "after_first" else 0
            position = torch.arange(int((prompt_length + keep).max()), device=device)[None]
            index = torch.where(position < first, position, torch.where(
                position < first + prompt_length, length + position - first, torch.where(
                    position < prompt_length + keep, position - prompt_length, padding)))
        source = torch.cat([embeds, table[rows].to(embeds.dtype), embeds.new_zeros(batch, 1, embeds.shape[-1])], 1)
        embeds = source.gather(1, index[..., None].expand(-1, -1, source.shape[-1]))  # (B, L, d)

        per_token = self._per_token(inputs, mask, length)
        fills = {"attention_mask": (1, 0), "token_type_ids": (0, 0), "labels": (IGNORE_INDEX, IGNORE_INDEX)}
        for name, tensor in per_token.items():
            if tensor is not None:
                at_prompt, at_padding = fills[name]
                source = torch.cat([tensor, tensor.new_full((batch, width), at_prompt),
                                    tensor.new_full((batch, 1), at_padding)], dim=1)
                inputs[name] = source.gather(1, index)
        renumber = self.layout == "prepend" and longest > int(prompt_length.min())  # rows start after padding
        return self._model_inputs(inputs, input_ids, embeds, list(per_token), renumber)

    def _per_token(self, inputs: dict, mask: torch.Tensor, length: int) -> dict[str, torch.Tensor | None]:
        """The inputs with one entry per token, which the prompt's positions are inserted into: the mask, token
        types, and token-level labels (a causal LM's; the prompt's are IGNORE_INDEX). Multi-label and regression
        targets are float, and T5's labels are the decoder's, not the input's: neither is per input token."""
        per_token = {"attention_mask": mask, "token_type_ids": inputs.get("token_type_ids")}
        labels = inputs.get("labels")
        token_level = isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length
        if token_level and not labels.is_floating_point() and self.layout != "encoder":
            per_token["labels"] = labels
        return per_token

    def _model_inputs(self, inputs: dict, input_ids: torch.Tensor | None, embeds: torch.Tensor,
                      per_token: list[str], renumber: bool) -> dict:
        """The model's inputs from the prompted embeddings (B, L, d) and per-token tensors. A model that pools its
        last token gets all padding moved to the left (every example's last token at -1); positions count from
        each row's first real token then, or where `renumber`; an encoder-decoder's encoder runs here on the
        embeddings, as its decoder (and T5's classification pooling) reads the plain ids."""
        if self.pools_last_token:
            order = torch.argsort(inputs["attention_mask"], dim=1, stable=True)  # padding first, order kept
            embeds = embeds.gather(1, order[..., None].expand_as(embeds))
            for name in per_token:
                if inputs.get(name) is not None:
                    inputs[name] = inputs[name].gather(1, order)
        if self.pools_last_token or renumber:
            inputs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        if self.layout == "encoder":
            encoder = self.model.get_encoder()
            inputs["encoder_outputs"] = encoder(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                                return_dict=True)
            inputs["input_ids"] = input_ids
        else:
            inputs["inputs_embeds"] = embeds
        return inputs

    def _stack_for_mixed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every task's prompt in one zero-padded table (T+1, P_max, d) (last row: no prompt), and the
        prompts' lengths (T+1,)."""
        prompts = list(self.prompt_embeddings.values())
        table = prompts[0].new_zeros(len(prompts) + 1, max(p.shape[0] for p in prompts), prompts[0].shape[1])
        for t, prompt in enumerate(prompts):
            table[t, : prompt.shape[0]] = prompt
        return table, torch.tensor([p.shape[0] for p in prompts] + [0])

    def generate(self, model: nn.Module, inputs: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`model.generate` with the active prompt. A causal LM returns input_ids + new tokens, as usual."""
        input_ids = kwargs.pop("input_ids", inputs)
        if self.layout != "prepend":  # T5: the encoder sees the prompt; its output is passed in
            return model.generate(**self.prepare_inputs({"input_ids": input_ids, **kwargs}))
        task = self.active_task
        embeds, mask = self._kept_tokens(model, input_ids, kwargs, [task])
        prompt = self.prompt_embeddings[task].to(embeds.dtype).expand(input_ids.shape[0], -1, -1)
        embeds = torch.cat([prompt, embeds], dim=1)
        mask = torch.cat([mask.new_ones(prompt.shape[:2]), mask], dim=1)
        return _generate_left_padded(model, input_ids, embeds, mask, kwargs)

    def generate_mixed(self, model: nn.Module, inputs: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """`generate` for a mixed-task batch of a decoder: each row gets its own task's prompt (none for
        tasks without one) in front of its tokens, all padding moved to the left; then one generation, whose
        other components read the per-row tasks from `task_state.per_example`."""
        if self.layout != "prepend":
            raise DeltaTuneError("mixed-task generation with prompt tuning needs a decoder-only model")
        input_ids = kwargs.pop("input_ids", inputs)
        per_example = self.task_state.per_example
        present = {task for task in per_example if task in self.prompt_embeddings}
        embeds, mask = self._kept_tokens(model, input_ids, kwargs, present)  # (B, n, d)
        longest = max(self.prompt_embeddings[task].shape[0] for task in present)
        rows, masks = [], []
        for row, task in enumerate(per_example):
            width = embeds.shape[-1]
            prompt = self.prompt_embeddings[task].to(embeds.dtype) if task in present else embeds.new_zeros(0, width)
            gap = longest - prompt.shape[0]  # (P_max - P_task) masked slots in front
            rows.append(torch.cat([embeds.new_zeros(gap, embeds.shape[-1]), prompt, embeds[row]]))
            masks.append(torch.cat([mask.new_zeros(gap), mask.new_ones(prompt.shape[0]), mask[row]]))
        embeds, mask = torch.stack(rows), torch.stack(masks)  # (B, P_max + n, d)
        return _generate_left_padded(model, input_ids, embeds, mask, kwargs)

    def _kept_tokens(self, model: nn.Module, input_ids: torch.Tensor, kwargs: dict,
                     tasks) -> tuple[torch.Tensor, torch.Tensor]:
        """The embeddings (B, n, d) and attention mask (B, n) of the last n input tokens: those that leave room
        for the longest of `tasks`' prompts and the new tokens (the context nearest them). Takes the mask out of
        `kwargs`."""
        mask = kwargs.pop("attention_mask", None)
        mask = torch.ones_like(input_ids) if mask is None else mask
        reserve = kwargs.get("max_new_tokens") or 0
        keep = min(self._fit(task, input_ids.shape[1], reserve=reserve) for task in tasks)
        return model.get_input_embeddings()(input_ids[:, -keep:]), mask[:, -keep:]

    def merge(self, task: str) -> None:
        raise MergeError("a prompt is not a weight change; prompt tuning cannot be merged into the base weights")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def unload(self) -> None:
        return None

    def extra_repr(self) -> str:
        return f"layout={self.layout}, tasks={self.tasks}"


def _generate_left_padded(model: nn.Module, input_ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                          kwargs: dict):
    """`model.generate` on input embeddings with every row's padding moved to the left (as generation needs);
    it returns the new tokens only, so the caller's `input_ids` are put back in front of them."""
    order = torch.argsort(mask, dim=1, stable=True)  # padding first, the order of the rest kept
    embeds, mask = embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order)
    output = model.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)  # new tokens only
    if isinstance(output, torch.Tensor):
        return torch.cat([input_ids, output.to(input_ids.device)], dim=1)
    output.sequences = torch.cat([input_ids, output.sequences.to(input_ids.device)], dim=1)
    return output


def inject(model: nn.Module, config: PromptTuning, task: str, state: TaskState, exclude: list[str]) -> None:
    """One PromptEmbedding at the model's root (once) holds every task's prompt."""
    root_component(model, "deltatune_prompt", lambda: PromptEmbedding(model, state)).add_task(task, config)
