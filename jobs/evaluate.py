"""Evaluate models on held-out sections: the entry point for ``ray job submit``.

Example::

    python jobs/evaluate.py models=[linear,dis,deepflow] k=[2,3,4]
    python jobs/evaluate.py data=allen data.root=/data data.genes=[Gad1] holdout=leave_one_out

``--help`` lists the keys, groups, examples and exit codes; ``--version`` the version.
"""

from atlinter_ray.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
