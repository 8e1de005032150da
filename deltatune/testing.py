"""What tests and benchmarks use: tiny random models and a tokenizer that fit them (no download), the HTTP
server on a background thread, and the bytes a model's block weights take as stored.

    from deltatune.testing import tiny_model, tiny_tokenizer, TINY_ZOO, tiny_model_of_type, BackgroundServer
"""

from __future__ import annotations

import threading
import time

from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from deltatune.core.architectures import in_transformer_block, linear_layers
from deltatune.core.quantize import QuantizedLinear
from deltatune.errors import ModelError
from deltatune.models import ModelKind

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
    sizes = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, **common)  # BERT's and Llama's names
    if arch == "bert":
        config = BertConfig(num_attention_heads=2, max_position_embeddings=TINY_MAX_POSITIONS, **sizes)
    elif arch == "roberta":
        # RoBERTa numbers positions from pad_token_id + 1, hence the two extra position embeddings.
        config = RobertaConfig(num_attention_heads=2, max_position_embeddings=TINY_MAX_POSITIONS + 2, **sizes)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_inner=64, n_positions=TINY_MAX_POSITIONS, **common)
    elif arch == "llama":
        config = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_MAX_POSITIONS,
                             **sizes)
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
    # encoders: RoBERTa-style data2vec-text, DeBERTa (v1), Funnel (pools the sequence between blocks), XLNet
    # (hidden states length-first), EuroBERT (2025, Llama-style blocks)
    "data2vec-text": _ROBERTA, "deberta": _BLOCKS,
    "funnel": dict(d_model=32, n_head=4, d_head=8, d_inner=64, block_sizes=[1, 1], num_decoder_layers=1),
    "xlnet": dict(d_model=32, n_layer=2, n_head=4, d_inner=64), "eurobert": _GQA,
    # code models: StarCoder/SantaCoder's multi-query GPT-BigCode, StarCoder2
    "gpt_bigcode": _GPT, "starcoder2": _GQA,
    # decoders released 2024-26
    "olmo2": _GQA, "olmo3": _GQA, "smollm3": _GQA, "exaone4": _GQA, "helium": dict(_GQA, head_dim=8),
    "glm4": dict(_GQA, head_dim=8), "seed_oss": dict(_GQA, head_dim=8), "hunyuan_v1_dense": dict(_GQA, head_dim=8),
    "ministral3": dict(_GQA, head_dim=8),
    # mixtures of experts (experts stored as 3-D parameters in transformers 5)
    "qwen2_moe": dict(_GQA, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      shared_expert_intermediate_size=32),
    "qwen3_moe": dict(_GQA, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "phimoe": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(_GQA, head_dim=8, num_local_experts=4, num_experts_per_tok=2),
    "minimax": dict(_GQA, num_local_experts=4, num_experts_per_tok=2),  # lightning (linear) attention blocks too
    "deepseek_v3": dict(_GQA, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4,
                        qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1),  # latent attention, dense block 0
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


class BackgroundServer:
    """The HTTP server on a thread of this process (tests, notebooks): `with BackgroundServer(engine) as url:`."""

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from deltatune.serving.app import bind, create_app

        self.engine = engine
        self.socket = bind(host, port)
        self.port = self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> str:
        self.engine.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()
        self.socket.close()


def with_random_deltas(model: nn.Module, configs: dict, scale: float = 0.3):
    """`model` with one delta per {task: method config} attached, every trained value moved by N(0, scale²) noise
    (seeded by the task's place), so each task changes the output (LoRA's B starts at zero, adapters at identity)."""
    import torch

    import deltatune

    for index, (task, config) in enumerate(configs.items()):
        model = deltatune.attach(model, config, task=task)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for tensor in model.task_parameters(task).values():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * scale)
    return model.eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights of the linear layers inside the transformer blocks, as stored (quantized or not)."""
    total = 0
    for name, layer in linear_layers(model).items():
        if in_transformer_block(name):
            total += layer.storage_bytes() if isinstance(layer, QuantizedLinear) else layer.weight.nbytes
    return total
