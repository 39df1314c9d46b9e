"""Download Allen ISH experiments: the entry point for ``ray job submit``.

Example::

    python jobs/download.py genes='[Gad1,Vip]' planes='[coronal]' output=data/allen
    ray job submit --working-dir . -- python jobs/download.py genes='[Gad1]'

``--help`` lists the keys, groups, examples and exit codes; ``--version`` the version.
"""

from atlinter_ray.cli import download_main

if __name__ == "__main__":
    download_main()
