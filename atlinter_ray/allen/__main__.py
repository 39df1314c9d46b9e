"""``python -m atlinter_ray.allen``: the Allen download job (``atlinter-ray-download``)."""

from atlinter_ray.cli import download_main

download_main()
