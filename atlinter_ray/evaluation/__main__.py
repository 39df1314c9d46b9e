"""``python -m atlinter_ray.evaluation``: the evaluation job (``atlinter-ray-evaluate``)."""

from atlinter_ray.cli import evaluate_main

evaluate_main()
