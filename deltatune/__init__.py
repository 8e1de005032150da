"""deltatune: parameter-efficient fine-tuning stored as small per-task deltas on one frozen base model.

    import deltatune
    model = deltatune.attach(model, deltatune.LoRA(r=8), task="sst2")   # freeze base, inject, train
    model.save_delta("deltas/sst2")                                     # only the changed parameters
    model = deltatune.load_delta(fresh_base, "deltas/sst2")             # onto another copy of the base
"""

from deltatune._version import __version__
from deltatune.combine import CombineConfig, combine_deltas
from deltatune.delta import DeltaModel, ParameterReport, attach, load_delta
from deltatune.errors import (
    ConfigError,
    DeltaError,
    DeltaTuneError,
    MergeError,
    PrefixError,
    TargetError,
    TaskError,
)
from deltatune.methods.adapter import Adapter
from deltatune.methods.bitfit import BitFit
from deltatune.methods.dora import DoRA
from deltatune.methods.full import FullFineTune
from deltatune.methods.ia3 import IA3
from deltatune.methods.lora import LoRA
from deltatune.methods.prefix import PrefixTuning
from deltatune.methods.prompt import PromptTuning
from deltatune.methods.top_layers import TopLayers
from deltatune.registry import build_config

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
    "PrefixTuning",
    "PromptTuning",
    "TargetError",
    "TaskError",
    "TopLayers",
    "attach",
    "build_config",
    "combine_deltas",
    "load_delta",
]
