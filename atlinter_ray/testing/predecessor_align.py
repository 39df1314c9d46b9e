"""The predecessor's align stage as a test oracle.

atlinter 0.2.3 aligned sections with ``data/align.py`` (shipped in its sdist, not in its
package), which calls ``register`` / ``transform`` of ``atlannot.ants`` (atlannot 0.1.3,
ANTsPy plus nibabel). Both sdists come from PyPI through :mod:`atlinter_ray.testing.pypi`
(cached); the files run unchanged.

Usage::

    align = predecessor_align()
    aligned = align.single_registration(nissl_slice, gene_section)
"""

from __future__ import annotations

import sys
import types

from atlinter_ray.testing import pypi
from atlinter_ray.testing.predecessor import PREDECESSOR_SPEC

ATLANNOT_SPEC = "atlannot==0.1.3"


def predecessor_align() -> types.ModuleType:
    """atlinter 0.2.3's ``data/align.py`` as a module, with atlannot 0.1.3 importable."""
    atlannot_src = pypi.extract(ATLANNOT_SPEC, sdist=True) / "atlannot-0.1.3" / "src"
    if str(atlannot_src) not in sys.path:
        sys.path.insert(0, str(atlannot_src))
    script = pypi.extract(PREDECESSOR_SPEC, sdist=True) / "atlinter-0.2.3" / "data" / "align.py"
    return pypi.load_source("atlinter_data_align", script)
