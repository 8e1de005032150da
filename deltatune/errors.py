"""Error types. Every user-facing error names the problem and the fix."""


class DeltaTuneError(ValueError):
    """Base class of deltatune's errors."""


class ConfigError(DeltaTuneError):
    """A setting is unknown or has the wrong type: a method's (`-o`, delta.json, a peft config, Python) or a
    command-line option's."""


class TargetError(DeltaTuneError):
    """A target module (or head) named by the user does not exist in the model."""


class DeltaError(DeltaTuneError):
    """A delta on disk cannot be loaded or saved (wrong base model, corrupt or unsafe file, bad JSON...).

    Everything wrong with the files is this error, also a bad task name written in delta.json: the
    caller can only fix it by choosing another file (or another name, `add_delta(path, task=...)`)."""


class TaskError(DeltaTuneError, KeyError):
    """A task name given by the caller is unknown (`use()`, a mixed batch), invalid or already taken."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MergeError(DeltaTuneError):
    """The active method cannot be merged into the base weights."""


class TrainingError(DeltaTuneError):
    """Training cannot go on (non-finite loss, exploding loss, nothing to train...)."""


class PrefixError(DeltaTuneError):
    """Prefix tuning cannot run as asked: a bad setting, an input that does not fit beside the prefix, or an
    architecture it does not support."""


class FewShotError(DeltaTuneError):
    """A prompt cannot be built or does not fit the model, or the task cannot be prompted."""


class QuantizationError(DeltaTuneError):
    """A quantized base cannot do what was asked (train its own weights, merge a delta into them), or the
    quantization asked for is unknown or its library missing."""
