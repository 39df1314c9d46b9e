"""``python -m atlinter_ray``: the interpolation job (same app as ``atlinter-ray``)."""

from atlinter_ray.cli import main

main()
