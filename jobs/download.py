"""Hydra entry point: download Allen ISH experiments (see ``conf/download.yaml``).

python jobs/download.py genes='[Gad1,Vip]' planes='[coronal]' output=data/allen
ray job submit --working-dir . -- python jobs/download.py genes='[Gad1]'
"""

from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from atlinter_ray.download import DownloadConfig, run_download, summary_dict
from atlinter_ray.errors import AtlinterRayError


@hydra.main(version_base="1.3", config_path="../conf", config_name="download")
def main(cfg: DictConfig) -> None:
    """Build the config, run the download, print the summary; exit 1 on any error."""
    logging.getLogger("atlinter_ray").setLevel(logging.INFO)
    try:
        config = DownloadConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
        summary = run_download(config)
    except AtlinterRayError as exc:  # unknown gene, bad config, failed experiments
        print(f"download failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary.describe())
    print(json.dumps({"summary": summary_dict(summary)}))


if __name__ == "__main__":
    main()
