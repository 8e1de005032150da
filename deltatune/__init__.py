"""deltatune: parameter-efficient fine-tuning stored as small per-task deltas on one frozen base model.

    import deltatune
    model = deltatune.attach(model, deltatune.LoRA(r=8), task="sst2")   # freeze base, inject, train
    model.save_delta("deltas/sst2")                                     # only the changed parameters
    model = deltatune.load_delta(fresh_base, "deltas/sst2")             # onto another copy of the base
"""

import logging

# transformers imports torchao when it is installed (for --quantize); on a CPU build torchao logs a warning for
# each CUDA-only extension it skips, and torch one per enum torchao registers: not actionable, so not shown.
for _logger in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_logger).setLevel(logging.ERROR)

from deltatune._version import __version__  # noqa: E402
from deltatune.delta import DeltaModel, ParameterReport, attach, load_delta  # noqa: E402
from deltatune.errors import (  # noqa: E402
    ConfigError,
    DeltaError,
    DeltaTuneError,
    MergeError,
    PrefixError,
    QuantizationError,
    TargetError,
    TaskError,
    UnknownTaskError,
)
from deltatune.formats.combine import CombineConfig, combine_deltas  # noqa: E402
from deltatune.methods.adapter import Adapter  # noqa: E402
from deltatune.methods.bitfit import BitFit  # noqa: E402
from deltatune.methods.dora import DoRA  # noqa: E402
from deltatune.methods.full import FullFineTune  # noqa: E402
from deltatune.methods.ia3 import IA3  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.methods.prefix import PrefixTuning  # noqa: E402
from deltatune.methods.prompt import PromptTuning  # noqa: E402
from deltatune.methods.registry import build_config  # noqa: E402
from deltatune.methods.top_layers import TopLayers  # noqa: E402

__all__ = [
    "__version__",
    "Adapter",
    "BitFit",
    "CombineConfig",
    "ConfigError",
    "DeltaError",
    "DeltaModel",
    "DeltaTuneError",
    "DoRA",
    "FullFineTune",
    "IA3",
    "LoRA",
    "MergeError",
    "ParameterReport",
    "PrefixError",
    "QuantizationError",
    "PrefixTuning",
    "PromptTuning",
    "TargetError",
    "TaskError",
    "TopLayers",
    "UnknownTaskError",
    "attach",
    "build_config",
    "combine_deltas",
    "load_delta",
]
