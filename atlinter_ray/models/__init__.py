"""Models: the two protocols, the registry, and the built-in implementations."""

from atlinter_ray.models import classical, context  # noqa: F401  (registers the built-ins)
from atlinter_ray.models.base import (
    FlowEstimator,
    PairInterpolator,
    available_models,
    build_model,
    register_model,
)

__all__ = [
    "FlowEstimator",
    "PairInterpolator",
    "available_models",
    "build_model",
    "register_model",
]
