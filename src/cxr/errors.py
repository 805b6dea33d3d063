"""Typed errors. Library code raises these; the CLI turns them into messages and exit codes."""


class CxrError(Exception):
    """Base class: a problem the user can fix, with a message that says what and where."""


class DataError(CxrError):
    """A table, split or dataset is malformed or inconsistent."""


class ImageError(CxrError):
    """An image file cannot be read or decoded."""


class ImageTooLarge(ImageError):
    """An image declares more pixels (or decompressed bytes) than the budget: refused before
    anything that size is allocated."""


class LeakageError(DataError):
    """A patient appears in more than one split."""

    def __init__(self, message: str, shared: dict | None = None):
        super().__init__(message)
        self.shared = shared or {}


class ModelError(CxrError):
    """Weights or a model bundle cannot be loaded."""


class CacheError(CxrError):
    """A preprocessed image cache is missing, stale, truncated or foreign."""


class ConfigError(CxrError):
    """A configuration file or option is invalid."""


class ServiceBusy(CxrError):
    """The inference queue is full: the work is refused now (try again later) instead of
    waiting behind an unbounded backlog."""


class DeadlineExceeded(CxrError):
    """The work's deadline passed before the model reached it: it was dropped, not run."""


class WorkerClosed(CxrError):
    """The inference worker is closed (or closing) and takes no more work."""


class OutputError(CxrError):
    """An output path that cannot be written as asked: a folder where a file is wanted, a
    file where a folder is, a missing parent folder, or a place that cannot be written."""


class MissingExtraError(CxrError):
    """A part of cxr whose packages are an extra that is not installed (``cxr[serve]``,
    ``cxr[dicom]``...): the message names the command that needs it and the pip line."""

    def __init__(self, extra: str, feature: str, module: str):
        super().__init__(
            f"{feature} needs the {extra} extra ({module} is not installed): "
            f'pip install "cxr[{extra}]"'
        )
        self.extra = extra
        self.feature = feature
        self.module = module
