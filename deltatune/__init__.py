"""deltatune: parameter-efficient fine-tuning stored as small per-task deltas on one frozen base model.

    import deltatune
    model = deltatune.attach(model, deltatune.LoRA(r=8), task="sst2")   # freeze base, inject, train
    model.save_delta("deltas/sst2")                                     # only the changed parameters
    model = deltatune.load_delta(fresh_base, "deltas/sst2")             # onto another copy of the base
"""

__version__ = "0.1.0"

from deltatune.delta import DeltaModel, ParameterReport, attach, load_delta  # noqa: E402
from deltatune.errors import DeltaError, DeltaTuneError, MergeError, TargetError, TaskError  # noqa: E402
from deltatune.methods.adapter import Adapter  # noqa: E402
from deltatune.methods.bitfit import BitFit  # noqa: E402
from deltatune.methods.full import FullFineTune  # noqa: E402
from deltatune.methods.lora import LoRA  # noqa: E402
from deltatune.methods.prompt import PromptTuning  # noqa: E402

__all__ = [
    "Adapter",
    "BitFit",
    "DeltaError",
    "DeltaModel",
    "DeltaTuneError",
    "FullFineTune",
    "LoRA",
    "MergeError",
    "ParameterReport",
    "PromptTuning",
    "TargetError",
    "TaskError",
    "attach",
    "load_delta",
]
