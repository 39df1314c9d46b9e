"""The two model protocols and the registry that builds models by name.

Every model the pipeline runs is one of:

* a **pair interpolator** ``(a, b, t) -> frame``: predicts the slice at fractional
  position ``t`` between two known sections ``a`` (t=0) and ``b`` (t=1);
* a **flow estimator** ``(a, b) -> flow``: the dense displacement between two
  sections; :class:`atlinter_ray.models.flow.FlowInterpolator` turns it into frames
  at any ``t``.

Inputs are batches of pairs laid out ``(N, C, H, W)`` (``C`` is 1 or 3), ``float32``, in the
dataset's own units: ``peak`` is the value of full intensity (255 for uint8 data).
Models that work on ``[0, 1]`` divide by ``peak`` themselves, so arithmetic models
such as ``linear`` stay exact on integer data.

A **context interpolator** is a pair interpolator that also reads known sections
beyond the bounding pair (the one before ``a`` and the one after ``b``, each given
with its distance); the planner lists them in :attr:`GapTask.context
<atlinter_ray.planning.GapTask>` and the worker reads them. Called as a plain pair
interpolator (no neighbours) it falls back to what two sections allow.

The registry maps a name (the Hydra ``model.name`` choice) to a factory. Built-in
models register with :func:`register_model`; models whose module imports torch are
listed in ``_LAZY_MODULES`` and imported only when asked for, so CPU workers running a
classical model never pay for torch.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np

from atlinter_ray.errors import UnknownModelError


class PairInterpolator(ABC):
    """Predicts frames between two images at fractional positions ``t``."""

    #: True when any ``t`` in (0, 1) is supported; False for midpoint-only models,
    #: which the engine drives by bisection.
    arbitrary_t: ClassVar[bool] = True
    #: Registry name, set on the class by :func:`register_model`; a wrapper such as
    #: :class:`~atlinter_ray.engine.ExactFallback` sets its own on the instance.
    name: str = ""
    #: With ``placement=atlinter``: the multiple the predecessor zero-padded a pair to
    #: once before bisecting on the padded canvas (32 for its RIFE); 1 for no padding.
    atlinter_canvas: ClassVar[int] = 1

    #: Where the model keeps its frames: None for host (numpy) models, else the torch
    #: device whose tensors :meth:`interpolate_items` takes and returns.
    device: Any = None

    @abstractmethod
    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Return ``(N, K, C, H, W)``: each pair ``(a[i], b[i])`` at the ``K`` positions ``t``."""

    def interpolate_items(
        self, a: Any, b: Any, pair: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> Any:
        """Return ``(M, C, H, W)``: item ``m`` is pair ``pair[m]`` at position ``t[m]``.

        Items of different pairs and positions go in one call, so a worker batches
        across tasks. This default asks :meth:`interpolate` once per distinct pair.
        """
        pair = np.asarray(pair)
        t = np.asarray(t, dtype=np.float32)
        out = np.empty((len(pair), *a.shape[1:]), dtype=np.result_type(a.dtype, np.float32))
        for i in np.unique(pair):
            which = np.flatnonzero(pair == i)
            out[which] = self.interpolate(a[i : i + 1], b[i : i + 1], t[which], peak)[0]
        return out

    def provenance(self) -> dict[str, Any]:
        """Describe the model for the output's per-slice provenance record."""
        return {"model": self.name, "checkpoint_sha256": None}


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A known section beyond the bounding pair: ``(C, H, W)`` and its distance ratio.

    ``ratio`` is the pair's gap divided by this section's distance to the nearer
    bound (1.0 on evenly spaced sections; 0.5 when the neighbour is twice as far).
    """

    image: np.ndarray
    ratio: float = 1.0


class ContextInterpolator(PairInterpolator):
    """A pair interpolator that also uses one known section on each side of the pair."""

    #: Known sections it reads on each side beyond the bounding pair.
    context: ClassVar[int] = 1

    @abstractmethod
    def interpolate_context(
        self,
        a: np.ndarray,
        b: np.ndarray,
        t: np.ndarray,
        peak: float,
        before: Neighbour | None,
        after: Neighbour | None,
    ) -> np.ndarray:
        """Return ``(K, C, H, W)``: the pair ``a``, ``b`` ``(C, H, W)`` at the ``K`` positions."""

    def interpolate(
        self, a: np.ndarray, b: np.ndarray, t: np.ndarray, peak: float = 1.0
    ) -> np.ndarray:
        """Frames ``(N, K, C, H, W)`` from the pairs alone (no neighbours)."""
        return np.stack(
            [self.interpolate_context(x, y, t, peak, None, None) for x, y in zip(a, b)]
        )


class FlowEstimator(ABC):
    """Estimates dense optical flow between two images.

    Convention (OpenCV's): ``a(x) ≈ b(x + F_ab(x))``; the flow has shape
    ``(N, 2, H, W)`` with channel 0 the x (column) and channel 1 the y (row)
    displacement in pixels.
    """

    name: ClassVar[str] = ""
    #: As :attr:`PairInterpolator.device`: None for host models, else a torch device.
    device: Any = None

    @abstractmethod
    def flow(self, a: Any, b: Any, peak: float = 1.0) -> Any:
        """Return the ``(N, 2, H, W)`` flow from each ``a`` to its ``b``.

        Host arrays in, host array out; a model with a torch :attr:`device` also takes
        tensors on that device and returns one there.
        """

    def provenance(self) -> dict[str, Any]:
        """Describe the model for the output's per-slice provenance record."""
        return {"model": self.name, "checkpoint_sha256": None}


Model = PairInterpolator | FlowEstimator
ModelFactory = Callable[..., Model]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}
# Models in modules that import torch (or other heavy libraries): name -> module.
_LAZY_MODULES: dict[str, str] = {
    "rife_hd": "atlinter_ray.models.rife",
    "rife_v3": "atlinter_ray.models.rife",
    "rife_v4": "atlinter_ray.models.rife",
    "cain": "atlinter_ray.models.cain",
    "raft": "atlinter_ray.models.raft",
    "raft_small": "atlinter_ray.models.raft",
    "maskflownet": "atlinter_ray.models.maskflownet",
}


def register_model(name: str) -> Callable[[F], F]:
    """Register a model class or factory under ``name`` (decorator)."""

    def decorate(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is registered twice")
        if isinstance(factory, type):
            if not issubclass(factory, (PairInterpolator, FlowEstimator)):
                raise TypeError(
                    f"@register_model({name!r}): {factory.__name__} is neither a "
                    "PairInterpolator nor a FlowEstimator"
                )
            factory.name = name
        _REGISTRY[name] = factory
        return factory

    return decorate


def is_torch_model(name: str) -> bool:
    """True for models that run on a torch device (they take ``device``, ``precision``...)."""
    return name in _LAZY_MODULES


def available_models() -> list[str]:
    """Sorted names of every model that :func:`build_model` accepts."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def build_model(name: str, **params: Any) -> Model:
    """Build the model registered as ``name`` with keyword ``params``.

    Raises :class:`UnknownModelError` (a ``KeyError``) listing the choices when the
    name is unknown.
    """
    if name not in _REGISTRY and name in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[name])
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())} "
            "(set it with model.name=<choice>)"
        )
    return _REGISTRY[name](**params)
