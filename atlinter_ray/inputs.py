"""The configured datasets at scale: URLs, validation and fingerprints, in parallel.

A job may name hundreds of datasets (``data.manifest``). Each is validated from its
``.json`` and its ``.npy`` header (float data is also scanned for NaN and its peak) and
fingerprinted (:mod:`atlinter_ray.identity`: a streamed sha256 of both files), in a
pool of :data:`THREADS` threads, so the wall time is that of the slowest few files
rather than their sum, and memory holds a few read blocks, never an array. Every bad
dataset is reported, not only the first: by default the job is refused listing all of
them; with ``data.skip_invalid=true`` the valid ones run and the others are reported
as skipped. A store that fails to serve a dataset (an outage, a dropped connection,
access denied) is not invalid data: it ends the job before any work, skip or not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from atlinter_ray.config import DataConfig
from atlinter_ray.dataset import Dataset, load_dataset
from atlinter_ray.errors import (
    AtlinterRayError,
    ConfigError,
    DatasetError,
    DatasetNotFoundError,
    StorageError,
    is_storage_error,
)
from atlinter_ray.identity import InputFingerprint, fingerprint

log = logging.getLogger(__name__)

#: Datasets validated and hashed at once (I/O bound: threads release the GIL).
THREADS = 16


@dataclass(frozen=True, slots=True)
class Inputs:
    """The valid datasets with their fingerprints, and the skipped ones with the reason."""

    datasets: list[Dataset]
    fingerprints: dict[str, InputFingerprint]
    skipped: dict[str, str] = field(default_factory=dict)


def dataset_urls(data: DataConfig) -> list[str]:
    """Every dataset URL named by ``data.genes``, ``data.datasets`` and the manifest."""
    urls = list(data.datasets)
    if data.genes:
        if not data.root:
            raise ConfigError(
                "data.genes is set but data.root is not: set data.root to the folder or "
                "URL holding <gene>.npy and <gene>.json"
            )
        check_root(data.root, data.storage_options)
        urls += [f"{data.root.rstrip('/')}/{g}" for g in data.genes]
    if data.manifest:
        try:
            with fsspec.open(data.manifest, "rt", **data.storage_options) as f:
                lines = [ln.split("#", 1)[0].strip() for ln in f]
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(
                f"{data.manifest}: manifest not found (data.manifest); give a text file "
                "with one dataset path or URL per line"
            ) from exc
        urls += [ln for ln in lines if ln]
    if not urls:
        raise ConfigError(
            "no datasets: set data.genes (with data.root), data.datasets or "
            "data.manifest, or use the bundled sample with data=sample"
        )
    return urls


def check_root(root: str, storage_options: Mapping[str, Any]) -> None:
    """Refuse a ``data.root`` folder that does not exist (rather than every file in it).

    A store that cannot be asked (credentials, network) is left to the dataset reads,
    whose errors name the file.
    """
    try:
        fs, path = fsspec.core.url_to_fs(root, **dict(storage_options))
        exists = fs.exists(path)
    except Exception:  # noqa: BLE001 - reported by the reads that follow, naming the file
        return
    if not exists:
        raise DatasetNotFoundError(
            f"data.root={root}: no such folder. Fix: give the folder (or URL) that holds "
            "<experiment>.npy + <experiment>.json (atlinter-ray-download writes data/allen)"
        )


def _shape3(shape: list[int]) -> tuple[int, int, int]:
    """``data.reference_shape`` as a 3-tuple; ConfigError otherwise."""
    if len(shape) != 3:
        raise ConfigError(
            f"data.reference_shape={list(shape)}: give three sizes (AP, DV, LR), e.g. "
            "[528, 320, 456] for the 25 um CCF"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def load_inputs(
    data: DataConfig,
    fingerprints: bool = True,
    progress: Callable[[int], None] | None = None,
    outside_ok: bool = False,
) -> Inputs:
    """Validate and fingerprint every configured dataset (in parallel); see the module doc.

    ``fingerprints=False`` skips the content hashes (jobs that write no markers);
    ``outside_ok`` accepts section numbers beyond the reference (see ``load_dataset``);
    ``progress(n)`` is called as datasets are checked. Raises
    :class:`~atlinter_ray.errors.DatasetError` listing every bad dataset unless
    ``data.skip_invalid``; two datasets with one name are always refused, and so is a
    dataset the store failed to serve (see :func:`unreadable_inputs`), whatever
    ``data.skip_invalid`` says.
    """
    urls = dataset_urls(data)
    reference = _shape3(data.reference_shape)
    opts = dict(data.storage_options)

    def check(url: str) -> tuple[Dataset, InputFingerprint | None]:
        ds = load_dataset(url, reference, opts, outside_ok)
        if not fingerprints:
            return ds, None
        return ds, fingerprint(ds)

    good: list[tuple[Dataset, InputFingerprint | None]] = []
    bad: dict[str, str] = {}
    unread: dict[str, BaseException] = {}
    with ThreadPoolExecutor(max_workers=min(THREADS, len(urls))) as pool:
        futures = [(u, pool.submit(check, u)) for u in urls]
        for url, future in futures:
            try:
                good.append(future.result())
            except DatasetError as exc:
                bad[url] = str(exc)
            except BaseException as exc:
                if isinstance(exc, Exception) and is_storage_error(exc):
                    unread[url] = exc
                else:  # Ctrl-C or a bug: stop now, not after every dataset is read
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
            if progress is not None:
                progress(1)
    if unread:
        raise unreadable_inputs(unread, len(urls))
    for url, reason in bad.items() if data.skip_invalid else ():
        log.warning("skipping %s: %s", url, reason)
    if bad and not data.skip_invalid:
        listing = "\n".join(f"  - {reason}" for reason in bad.values())
        raise DatasetError(
            f"{len(bad)} of {len(urls)} datasets are invalid:\n{listing}\nFix each one, or "
            "set data.skip_invalid=true to run the others and report these as skipped."
        )
    if not good:
        raise DatasetError(f"none of the {len(urls)} datasets is valid; see the warnings above")
    seen: dict[str, str] = {}
    for ds, _ in good:
        if ds.id in seen:
            raise ConfigError(
                f"two datasets are both named {ds.id!r} ({seen[ds.id]} and "
                f"{ds.images_url}); outputs are named by dataset, so rename one"
            )
        seen[ds.id] = ds.images_url
    return Inputs([ds for ds, _ in good], {ds.id: fp for ds, fp in good if fp}, bad)


def unreadable_inputs(unread: Mapping[str, BaseException], total: int) -> AtlinterRayError:
    """The error for datasets the store failed to serve: never "invalid", never skipped.

    Access denied on every one is a setting to fix (exit 2); anything else (a network
    failure, an outage, a throttled store) ends the job before any work (exit 1), and
    rerunning the same command once the store answers goes on.
    """
    listing = "\n".join(f"  - {url}: {type(exc).__name__}: {exc}" for url, exc in unread.items())
    head = f"{len(unread)} of {total} datasets could not be read from their store"
    if all(isinstance(exc, PermissionError) for exc in unread.values()):
        return ConfigError(
            f"{head} (access denied):\n{listing}\nFix: give credentials that may read them "
            "in data.storage_options (or the environment)."
        )
    return StorageError(
        f"{head}:\n{listing}\nNothing was written. Fix: rerun the same command once the "
        "store answers; data.skip_invalid skips invalid datasets, never unreadable ones."
    )


def load_datasets(data: DataConfig, outside_ok: bool = False) -> list[Dataset]:
    """Every configured dataset, validated (in parallel), without fingerprints."""
    return load_inputs(data, fingerprints=False, outside_ok=outside_ok).datasets
