"""Exceptions raised on bad input. Each message names the offending thing and how to fix it."""


class DeltaRouterError(Exception):
    """Base class: the CLI prints these without a traceback."""


class BaseModelError(DeltaRouterError):
    """A base model cannot be resolved, fetched or loaded."""


class WheelError(DeltaRouterError):
    """A PyPI wheel cannot be downloaded or lacks the expected file."""


class InvalidModelError(DeltaRouterError):
    """A path is not a usable PEFT adapter or HF model directory, or its files are corrupt."""


class IncompatibleBaseError(DeltaRouterError):
    """A finetune was trained on a different base model than the one it is compared with."""


class ProbeError(DeltaRouterError):
    """A probe set is empty or malformed."""


class SpaceMismatchError(DeltaRouterError):
    """Embeddings from different bases / probes / layers / poolings would be compared."""


class IndexFormatError(DeltaRouterError):
    """An index directory is missing, corrupt, or written by another format version."""


class DuplicateModelError(DeltaRouterError):
    """A model id is already in the index (pass replace=True / --replace to overwrite)."""


class UnknownModelError(DeltaRouterError, KeyError):
    """A model id is not in the index."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(DeltaRouterError):
    """A dataset cannot be fetched, parsed or split."""


class MergeError(DeltaRouterError):
    """A merge recipe is unknown or invalid, or mergekit failed."""


class OutputExistsError(DeltaRouterError, FileExistsError):
    """An output path exists and the command would replace what it did not create (pass --force)."""


class StoredFieldError(DeltaRouterError, ValueError):
    """A stored record (a dataclass as JSON) has a missing, unknown or wrong-typed field.

    A ValueError too, so a reader that wraps parse errors (the index) adds its file's name.
    """


class InvalidModelIdError(DeltaRouterError):
    """A model id breaks the id rule (see ``delta_router.model_ids``)."""
