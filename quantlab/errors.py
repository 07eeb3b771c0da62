"""Errors that a user can act on. The CLI prints them as one line, without a traceback."""


class QuantlabError(Exception):
    """Base class: the message names the bad value and what would be valid."""


class ConfigError(QuantlabError, ValueError):
    """A setting is invalid (unknown model, engine, nonsense number, ...)."""


class DataError(QuantlabError):
    """The dataset is missing, malformed, or holds a file that cannot be decoded."""


class CheckpointError(QuantlabError):
    """The float checkpoint is missing, unsafe, or does not match the architecture."""


class StoreError(QuantlabError):
    """The store cannot be reached, read or written.

    `transient` is True when the store stopped answering (unreachable, throttled, 5xx) and
    our retries ran out: trying again later may work. A denied request or a missing bucket is
    not transient.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class IntegrityError(QuantlabError):
    """Stored content does not match its manifest (sha256, size, schema)."""


class ExportCheckError(QuantlabError):
    """An export (ONNX, OpenVINO IR) failed its run's check against its own artifact: it does
    not compute what the variant computes, or its quantization was lost."""


class NotFoundError(QuantlabError, LookupError):
    """A run, alias or variant that the store does not hold."""


class RegressionError(QuantlabError):
    """The regression gate refused a run's model: worse than the current best (see manifest)."""
