"""Every error type of deltatune (and its one warning type). Every user-facing error names the problem and the
fix. The server's HTTP status for each is `serving/http_errors.py`'s table."""


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


class UnknownTaskError(TaskError):
    """The task named is not loaded (or was removed meanwhile): HTTP 404 in `deltatune serve`, where an invalid or
    taken name (a plain TaskError) is the request's mistake (400)."""


class MergeError(DeltaTuneError):
    """The active method cannot be merged into the base weights."""


class TrainingError(DeltaTuneError):
    """Training cannot go on (non-finite loss, exploding loss, nothing to train...)."""


class PrefixError(DeltaTuneError):
    """Prefix tuning cannot run as asked: a bad setting, an input that does not fit beside the prefix, or an
    architecture it does not support."""


class FewShotError(DeltaTuneError):
    """A prompt cannot be built or does not fit the model, or the task cannot be prompted."""


class TrackerError(DeltaTuneError):
    """An experiment tracker named in `--report-to` is unknown, or its package is not installed."""


class QuantizationError(DeltaTuneError):
    """A quantized base cannot do what was asked (train its own weights, merge a delta into them), or the
    quantization asked for is unknown or its library missing."""


class ModelError(DeltaTuneError):
    """A model cannot be found or loaded; the message says which shortcuts exist and how to install them."""


class DataError(DeltaTuneError):
    """Task data cannot be found or read: the message names the file (and line) and how to fix it."""


class ChatTemplateError(DataError):
    """A chat file needs a chat template that the tokenizer does not have, or the template is unusable."""


class MetricUnavailableError(DeltaTuneError):
    """A metric's dependency (pycocoevalcap, Java) is missing; the message says how to get it."""


# ---- serving ------------------------------------------------------------------------------------------------
class Overloaded(DeltaTuneError):
    """The request queue is full: try again later (HTTP 429 with Retry-After, on every route)."""


class ShuttingDown(Overloaded):
    """The server is closing and takes no more requests (HTTP 503)."""


class LoadingRefused(DeltaTuneError):
    """A delta path given over HTTP lies outside --delta-root, or contains `..` (HTTP 400)."""


class LoadingOff(LoadingRefused):
    """Loading and removing deltas over HTTP is off: the server was started without --allow-loading (HTTP 403)."""


class LimitError(DeltaTuneError):
    """A request asks for more than the server allows (prompt tokens, max_tokens, n): HTTP 400."""


class ClientGone(DeltaTuneError):
    """The client closed its connection before its answer (nobody reads this one)."""


# ---- warnings -----------------------------------------------------------------------------------------------
class LengthWarning(UserWarning):
    """Training rows longer than --max-length were cut or dropped (how many, and which)."""
