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
