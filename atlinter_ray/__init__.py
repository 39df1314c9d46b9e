"""atlinter_ray: reconstruct whole gene-expression volumes from sparse sections on Ray."""

__version__ = "0.1.0"
