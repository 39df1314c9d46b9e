"""Interpolate many gene datasets on Ray: the entry point for ``ray job submit``.

Example::

    python jobs/interpolate.py model=farneback data=allen data.root=/data \
        data.genes=[Gad1,Pvalb] output.root=s3://bucket/volumes storage=s3

``--help`` lists the keys, groups, examples and exit codes; ``--version`` the version.
"""

from atlinter_ray.cli import main

if __name__ == "__main__":
    main()
