"""The align job: every ISH section registered to its slice of the Nissl volume (ANTsPy).

:mod:`~atlinter_ray.align.registration` registers one section (pure: arrays in, arrays
out); :mod:`~atlinter_ray.align.worker` aligns one experiment and writes it;
:mod:`~atlinter_ray.align.job` is the driver; :mod:`~atlinter_ray.align.config` its schema.
ANTsPy comes with the ``align`` extra: ``pip install "atlinter_ray[align]"``.
"""
