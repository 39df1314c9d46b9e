"""Align experiments to the Nissl volume: the entry point for ``ray job submit``.

Example::

    python jobs/align.py data.root=data/allen data.genes=[100048576] \
        reference=data/allen/ara_nissl_25.nrrd output.root=data/aligned
    ray job submit --working-dir . -- python jobs/align.py data.root=s3://bucket/allen ...

``--help`` lists the keys, groups, examples and exit codes; ``--version`` the version.
"""

from atlinter_ray.cli import align_main

if __name__ == "__main__":
    align_main()
