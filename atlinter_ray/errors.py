"""The package's small error hierarchy.

Every error names what is wrong, where (file, field) and how to fix it. Each
subclass also inherits the builtin a caller would naturally catch, so
``except ValueError`` keeps working for code that does not know our types.
"""

from __future__ import annotations

from typing import ClassVar


class AtlinterRayError(Exception):
    """Base class of every error raised on purpose by atlinter_ray.

    ``exit_status`` is what a job exits with when this error ends it: 2 for bad
    configuration or input (found before anything is written), 1 for failures while
    running (a rerun of the same command finishes the work).
    """

    exit_status: ClassVar[int] = 2


class DatasetError(AtlinterRayError, ValueError):
    """A gene dataset (images + metadata) is missing, unreadable or inconsistent."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file does not exist at the given path or URL."""


class ConfigError(AtlinterRayError, ValueError):
    """A configuration value is invalid or inconsistent with the data."""


class CheckpointError(AtlinterRayError, ValueError):
    """A checkpoint file is missing, unsafe, or does not match the architecture."""


class StoreError(AtlinterRayError, ValueError):
    """The output store holds data that conflicts with the requested run."""


class OutputRootError(StoreError):
    """The output root cannot be used at all (missing bucket, a file, read-only, no access)."""


class OutputBusyError(StoreError):
    """Another driver holds the output root (its lease is live); nothing was written."""


class StorageCredentialsError(OutputRootError):
    """An object store refused the credentials (wrong key or secret, or no permission)."""


class StorageError(AtlinterRayError, OSError):
    """Reading or writing a store failed while running (network, permissions, space)."""

    exit_status: ClassVar[int] = 1


class StoreHungError(StorageError):
    """A store stopped answering: a request got no answer in the time given."""


class IncompleteOutputError(AtlinterRayError, RuntimeError):
    """The store does not hold what the run's markers claim, or the run lost its lease."""

    exit_status: ClassVar[int] = 1


class DamagedObjectError(IncompleteOutputError):
    """A stored object of an image does not decode (damaged since it was written)."""


class SupersededError(IncompleteOutputError):
    """Another driver took the output's lease over: this run's commits are refused."""


#: Top-level packages whose exceptions mean that talking to a store failed.
_STORAGE_PACKAGES = ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs", "adlfs", "fsspec",
                     "urllib3", "requests", "obstore")


def is_storage_error(exc: BaseException) -> bool:
    """True for failures of a store: OS errors and the storage clients' own exceptions.

    Our own errors count only when they are :class:`StorageError` (a missing dataset
    file is bad input, not a failing store).
    """
    if isinstance(exc, AtlinterRayError):
        return isinstance(exc, StorageError)
    if isinstance(exc, OSError | TimeoutError):
        return True
    return any(cls.__module__.split(".")[0] in _STORAGE_PACKAGES for cls in type(exc).__mro__)


class UnknownModelError(AtlinterRayError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class NonFiniteOutputError(AtlinterRayError, ArithmeticError):
    """A model produced NaN or inf even in float32: nothing is written for the batch."""

    exit_status = 1


class FatalWorkerError(AtlinterRayError, RuntimeError):
    """The worker's device is unusable (a CUDA error): the process must end.

    The actor pool kills the actor, starts a replacement and reruns its tasks elsewhere.
    """

    exit_status = 1
