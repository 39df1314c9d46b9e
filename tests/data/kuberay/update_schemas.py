"""Regenerate the KubeRay CRD schemas that tests/test_infra.py validates against.

The CRDs (``ray-operator/config/crd/bases/ray.io_*.yaml``, 0.9-1.4 MB each) are reduced
to the ``openAPIV3Schema`` of their ``v1`` version with every ``description`` removed
(the text is ~85 % of the bytes and validates nothing), then gzipped (~10 KB each).

    git clone https://github.com/ray-project/kuberay /tmp/kuberay
    python tests/data/kuberay/update_schemas.py /tmp/kuberay v1.7.0

Update ``KUBERAY_VERSION`` in tests/test_infra.py to the tag you used.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
KINDS = ("rayclusters", "rayjobs")


def strip_descriptions(node):
    """Return ``node`` without ``description`` keys, recursively."""
    if isinstance(node, dict):
        return {k: strip_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip_descriptions(v) for v in node]
    return node


def extract(crd: dict, version: str = "v1") -> dict:
    """The OpenAPI v3 schema of one served version of a CRD, plus its identity."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return {
                "group": crd["spec"]["group"],
                "version": version,
                "kind": crd["spec"]["names"]["kind"],
                "openAPIV3Schema": strip_descriptions(entry["schema"]["openAPIV3Schema"]),
            }
    raise KeyError(f"CRD {crd['metadata']['name']} has no version {version!r}")


def main(repo: str, tag: str) -> None:
    for kind in KINDS:
        path = f"ray-operator/config/crd/bases/ray.io_{kind}.yaml"
        text = subprocess.run(
            ["git", "-C", repo, "show", f"{tag}:{path}"], check=True, capture_output=True
        ).stdout
        doc = extract(yaml.safe_load(text))
        doc["source"] = f"ray-project/kuberay {tag} {path}"
        out = HERE / f"{kind}.{tag}.json.gz"
        payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        # mtime=0: the same input gives the same bytes.
        out.write_bytes(gzip.compress(payload, mtime=0))
        print(f"{out.relative_to(HERE.parents[2])}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
