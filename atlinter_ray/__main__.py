"""``python -m atlinter_ray``: the interpolation job (same app as jobs/interpolate.py)."""

from atlinter_ray.cli import main

main()
