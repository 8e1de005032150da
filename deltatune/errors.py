"""Error types. Every user-facing error names the problem and the fix."""


class DeltaTuneError(ValueError):
    """Base class of deltatune's errors."""


class TargetError(DeltaTuneError):
    """A target module (or head) named by the user does not exist in the model."""


class DeltaError(DeltaTuneError):
    """A delta on disk cannot be loaded (wrong base model, corrupt or unsafe file, bad JSON...)."""


class TaskError(DeltaTuneError, KeyError):
    """An unknown task name was given to `use()` or in a mixed batch."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MergeError(DeltaTuneError):
    """The active method cannot be merged into the base weights."""
