"""``python -m atlinter_ray.align``: the align job (``atlinter-ray-align``)."""

from atlinter_ray.cli import align_main

align_main()
