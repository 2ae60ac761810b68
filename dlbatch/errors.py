"""Errors a user sees as one line. Jobs print ``str(err)`` and exit non-zero; no stack trace."""


class DlbatchError(Exception):
    """Base for errors that carry a complete, user-facing one-line message."""


class ConfigError(DlbatchError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""


class DataError(DlbatchError):
    """A dataset cannot be used: missing files or columns, wrong types, corrupt Parquet, too many rejects."""


class CheckpointError(DlbatchError):
    """A checkpoint is missing, truncated or tampered with."""


class TrainingError(DlbatchError):
    """A fit went wrong in a way a retry cannot mend (a loss that became NaN or infinite)."""


class QualityError(DlbatchError):
    """A night's model is below the quality floor. Raised after every task has written its outputs; the
    summaries ride along so the job can still print them."""

    def __init__(self, message: str, summaries: list):
        super().__init__(message)
        self.summaries = summaries
