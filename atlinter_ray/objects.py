"""Object I/O under an output root: obstore on ``s3://``, fsspec everywhere else.

Keys are ``/``-joined and relative to the root. On ``s3://`` every request goes through
``obstore`` (Rust ``object_store``): 5–18× less client CPU per request than s3fs, and
conditional PUTs that report a conflict the same way on every server
(``benchmarks/bench_scale.py`` measures the client's CPU per slice). Local disk and the
other fsspec protocols keep fsspec. Zarr reaches the same objects through
:meth:`Objects.zarr_location` (``zarr.storage.ObjectStore`` on ``s3://``).

``output.storage_options`` keep s3fs's names on ``s3://`` (``key``, ``secret``,
``token``, ``endpoint_url``, ``anon``, ``client_kwargs.region_name``,
``config_kwargs.retries.max_attempts`` and the timeouts); obstore's own ``S3Config``
names are accepted too. Credentials not given come from the environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import fsspec

from atlinter_ray.errors import ConfigError, StorageCredentialsError
from atlinter_ray.files import is_local, write_atomic

#: Requests in flight at once for a batch of small objects.
BATCH_THREADS = 16

#: obstore's ``S3Config`` names, accepted as they are.
_S3_CONFIG = frozenset({
    "access_key_id", "secret_access_key", "session_token", "endpoint", "region",
    "default_region", "skip_signature", "virtual_hosted_style_request", "unsigned_payload",
    "checksum_algorithm", "conditional_put", "disable_tagging", "request_payer",
    "server_side_encryption", "sse_kms_key_id", "sse_bucket_key_enabled", "role_arn",
    "role_session_name", "web_identity_token_file", "sts_endpoint",
})
#: s3fs's names, and obstore's.
_RENAMED = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
            "endpoint_url": "endpoint", "anon": "skip_signature"}
_CLIENT_KWARGS = {"region_name": "region", "endpoint_url": "endpoint",
                  "aws_access_key_id": "access_key_id",
                  "aws_secret_access_key": "secret_access_key",
                  "aws_session_token": "session_token"}
#: s3fs options that mean nothing to obstore's client (it pools and splits on its own).
_IGNORED = frozenset({"max_concurrency", "skip_instance_cache", "use_listings_cache",
                      "listings_expiry_time", "asynchronous", "loop", "default_block_size",
                      "default_fill_cache", "default_cache_type", "version_aware",
                      "use_ssl", "cache_regions"})
_CREDENTIAL_HELP = ("output.storage_options.key / .secret (and .token), or the environment's "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN)")


def _duration(value: Any, name: str) -> timedelta:
    try:
        return timedelta(seconds=float(value))
    except (TypeError, ValueError):
        raise ConfigError(f"output.storage_options.{name}={value!r} is not a number of "
                          "seconds. Fix: give seconds, e.g. 30.") from None


def s3_settings(options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """obstore's ``(S3Config, ClientConfig, RetryConfig)`` for s3fs-style storage options.

    An option neither client knows is refused, naming it, rather than silently ignored.
    """
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    for name, value in options.items():
        if name in _IGNORED:
            continue
        if name in _RENAMED or name in _S3_CONFIG:
            config[_RENAMED.get(name, name)] = value
        elif name == "client_kwargs" and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                if sub not in _CLIENT_KWARGS:
                    raise _unknown(f"client_kwargs.{sub}")
                config[_CLIENT_KWARGS[sub]] = subvalue
        elif name == "config_kwargs" and isinstance(value, Mapping):
            for sub, subvalue in value.items():
                if sub == "retries" and isinstance(subvalue, Mapping):
                    attempts = subvalue.get("max_attempts", subvalue.get("total_max_attempts"))
                    if attempts is not None:
                        retry["max_retries"] = max(int(attempts) - 1, 0)
                elif sub in ("connect_timeout", "read_timeout"):
                    client[sub] = _duration(subvalue, f"config_kwargs.{sub}")
                else:
                    raise _unknown(f"config_kwargs.{sub}")
        else:
            raise _unknown(name)
    if config.get("skip_signature") is not True:
        config.pop("skip_signature", None)
    endpoint = str(config.get("endpoint", ""))
    if endpoint.startswith("http://"):
        client["allow_http"] = True
    if endpoint and "region" not in config and not os.environ.get("AWS_REGION"):
        config["region"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    return config, client, retry


def _unknown(name: str) -> ConfigError:
    return ConfigError(
        f"output.storage_options.{name} is not an S3 option this client knows. Fix: use "
        "key, secret, token, endpoint_url, anon, client_kwargs.region_name, "
        "config_kwargs.retries.max_attempts, config_kwargs.connect_timeout/read_timeout, "
        "or obstore's S3Config names (region, endpoint, ...); remove it otherwise."
    )


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a store guarantees, for the protocols built on it (:mod:`atlinter_ray.ledger`,
    :mod:`atlinter_ray.lease`)."""

    #: :meth:`Objects.put_if` is refused by the store itself when the object exists or
    #: changed (S3's ``If-None-Match``/``If-Match``); else the caller must read back.
    #: (Listings need no guarantee: a marker a stale listing misses only redoes its task,
    #: and completeness is proved by reading every object back.)
    conditional_create: bool


class Objects(ABC):
    """Whole-object reads and writes under one root (keys relative to it)."""

    url: str

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this store guarantees (:class:`Capabilities`)."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""

    @abstractmethod
    def get_tagged(self, key: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and its ETag (None where the store has none), or None."""

    @abstractmethod
    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: bytes}`` of the objects that exist, read concurrently."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store an object whole (a reader never sees part of it)."""

    @abstractmethod
    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """Store several objects, concurrently where the store can."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """Store only if absent (``etag`` None) or still the version ``etag``; the new ETag.

        A lost race raises :class:`FileExistsError`. A store without conditional writes
        writes unconditionally: the caller reads the object back to know who won.
        """

    @abstractmethod
    def delete(self, keys: list[str]) -> None:
        """Remove objects; missing ones are fine."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under the folder ``prefix``."""

    @abstractmethod
    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` of every object under the folder ``prefix`` (a fresh listing)."""

    @abstractmethod
    def zarr_location(self, key: str) -> tuple[Any, dict[str, Any] | None]:
        """What zarr opens for the folder ``key``: ``(store or URL, storage_options)``."""

    def local_path(self, key: str) -> str | None:
        """The file behind ``key`` on local disk, or None on any other store."""
        return None


def open_objects(url: str, storage_options: Mapping[str, Any] | None = None) -> Objects:
    """The object I/O for a root: :class:`S3Objects` for ``s3://``, else :class:`FsspecObjects`."""
    if url.startswith(("s3://", "s3a://")):
        return S3Objects(url, storage_options or {})
    return FsspecObjects(url, storage_options or {})


def _join(*parts: str) -> str:
    return posixpath.join(*[p.strip("/") for p in parts if p.strip("/")])


class FsspecObjects(Objects):
    """Objects on local disk or any fsspec filesystem."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options)
        self.fs, root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.root = root.rstrip("/") or root
        self._made_dirs: set[str] = set()

    @property
    def capabilities(self) -> Capabilities:
        """No conditional writes through fsspec."""
        return Capabilities(conditional_create=False)

    def path(self, key: str) -> str:
        """The filesystem path of ``key``."""
        return posixpath.join(self.root, key) if key else self.root

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        try:
            return bytes(self.fs.cat_file(self.path(key)))
        except FileNotFoundError:
            return None

    def get_tagged(self, key: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and its ETag where the filesystem reports one."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        try:
            info = self.fs.info(path)
            return bytes(self.fs.cat_file(path)), info.get("ETag")
        except FileNotFoundError:
            return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: bytes}`` of the objects that exist (one concurrent batch)."""
        paths = {self.path(k): k for k in keys}
        found = self.fs.cat(list(paths), on_error="omit") if paths else {}
        return {paths[p]: bytes(b) for p, b in found.items() if p in paths and isinstance(b, bytes)}

    def _parents(self, paths: list[str], again: bool = False) -> None:
        """Make local folders (once, or ``again`` when one was removed since); object
        stores have none."""
        if not is_local(self.fs):
            return
        parents = {posixpath.dirname(p) for p in paths}
        for parent in parents if again else parents - self._made_dirs:
            self.fs.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    def put(self, key: str, data: bytes) -> None:
        """Write through a temporary sibling on local disk; one PUT elsewhere.

        The folder is made every time (the cache of made folders serves batches): a
        single record may follow someone's removal of its folder.
        """
        path = self.path(key)
        self._made_dirs.discard(posixpath.dirname(path))
        self._parents([path])
        try:
            write_atomic(self.fs, path, data)
        except FileNotFoundError:  # its folder was removed by someone else since
            self._parents([path], again=True)
            write_atomic(self.fs, path, data)

    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """Store several objects (concurrently where the filesystem can)."""
        paths = {self.path(k): v for k, v in blobs.items()}
        self._parents(list(paths))
        try:
            self.fs.pipe(paths)
        except FileNotFoundError:  # a folder was removed by someone else since
            self._parents(list(paths), again=True)
            self.fs.pipe(paths)

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """An unconditional write here (fsspec sends no conditions): the caller reads back."""
        self.put(key, data)
        return None

    def delete(self, keys: list[str]) -> None:
        """Remove objects; missing ones are fine."""
        for key in keys:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(key))
            self.fs.invalidate_cache(posixpath.dirname(self.path(key)))

    def delete_prefix(self, prefix: str) -> None:
        """Remove a folder and everything under it."""
        path = self.path(prefix)
        self.fs.invalidate_cache(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.fs.invalidate_cache(path)

    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` under ``prefix``; fsspec's directory cache is bypassed."""
        folder = self.path(prefix)
        self.fs.invalidate_cache(folder)
        try:
            found = self.fs.find(folder, detail=True)
        except FileNotFoundError:
            return {}
        start = self.root.rstrip("/") + "/"
        return {p[len(start):]: int(info.get("size") or 0) for p, info in found.items()
                if p.startswith(start)}

    def zarr_location(self, key: str) -> tuple[Any, dict[str, Any] | None]:
        """The folder's URL, with the storage options (None for plain local paths)."""
        url = f"{self.url}/{key}" if key else self.url
        return url, (self.storage_options if "://" in url else None)

    def local_path(self, key: str) -> str | None:
        """The file behind ``key`` on local disk, or None."""
        return self.path(key) if is_local(self.fs) else None


class S3Objects(Objects):
    """Objects in an S3 bucket (any S3-protocol server) through obstore."""

    def __init__(self, url: str, storage_options: Mapping[str, Any]) -> None:
        self.url = url.rstrip("/")
        bucket, _, prefix = self.url.split("://", 1)[1].partition("/")
        if not bucket:
            raise ConfigError(f"{url}: no bucket named. Fix: write s3://BUCKET/folder.")
        config, client, retry = s3_settings(storage_options)
        self.bucket, self.prefix = bucket, prefix.strip("/")
        # the settings are checked names (s3_settings) in plain dicts: obstore's TypedDicts
        self._settings: dict[str, Any] = {"config": config, "client_options": client or None,
                                          "retry_config": retry or None}
        self.store = self._store(self.prefix)

    @property
    def capabilities(self) -> Capabilities:
        """Conditional PUTs (``If-None-Match``, ``If-Match``), as S3 answers them."""
        return Capabilities(conditional_create=True)

    def _store(self, prefix: str) -> Any:
        """An obstore ``S3Store`` on ``prefix`` of the bucket."""
        from obstore.store import S3Store

        return S3Store(self.bucket, prefix=prefix or None, **self._settings)

    @contextlib.contextmanager
    def _errors(self, key: str) -> Iterator[None]:
        """Turn a refusal of our credentials into an error naming them and the fix."""
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        try:
            yield
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageCredentialsError(
                f"{self.url}/{key}: the S3 server refused these credentials "
                f"({_s3_code(str(exc))}). Fix: check {_CREDENTIAL_HELP}; the key must be "
                "allowed to read, write, list and delete under this prefix."
            ) from None

    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when there is none."""
        found = self.get_tagged(key)
        return None if found is None else found[0]

    def get_tagged(self, key: str) -> tuple[bytes, str | None] | None:
        """The object's bytes and ETag (one GET), or None."""
        import obstore

        with self._errors(key):
            try:
                result = obstore.get(self.store, key)
                return bytes(result.bytes()), result.meta.get("e_tag")
            except FileNotFoundError:
                return None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        """``{key: bytes}`` of the objects that exist, ``BATCH_THREADS`` GETs at a time."""
        if len(keys) <= 1:
            return {k: b for k in keys if (b := self.get(k)) is not None}
        with ThreadPoolExecutor(min(BATCH_THREADS, len(keys))) as pool:
            blobs = dict(zip(keys, pool.map(self.get, keys)))
        return {k: b for k, b in blobs.items() if b is not None}

    def put(self, key: str, data: bytes) -> None:
        """One PUT (all or nothing on S3)."""
        import obstore

        with self._errors(key):  # one request, not a multipart upload of 5 MB parts
            obstore.put(self.store, key, data, use_multipart=False)

    def put_many(self, blobs: Mapping[str, bytes]) -> None:
        """``BATCH_THREADS`` PUTs at a time."""
        items = list(blobs.items())
        if len(items) <= 1:
            for key, data in items:
                self.put(key, data)
            return
        with ThreadPoolExecutor(min(BATCH_THREADS, len(items))) as pool:
            list(pool.map(lambda item: self.put(*item), items))

    def put_if(self, key: str, data: bytes, etag: str | None) -> str | None:
        """A PUT with ``If-None-Match: *`` or ``If-Match: etag``; a conflict: FileExistsError."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        mode: Any = "create" if etag is None else {"e_tag": etag}
        with self._errors(key):
            try:
                result = obstore.put(self.store, key, data, mode=mode)
            except (AlreadyExistsError, PreconditionError) as exc:
                raise FileExistsError(f"{self.url}/{key}: {_s3_code(str(exc))}") from None
        return result.get("e_tag")

    def delete(self, keys: list[str]) -> None:
        """One bulk DELETE per 1,000 keys (none for no keys); missing ones are fine."""
        import obstore

        with self._errors(keys[0] if keys else ""):
            for start in range(0, len(keys), 1000):
                obstore.delete(self.store, keys[start:start + 1000])

    def delete_prefix(self, prefix: str) -> None:
        """Remove every object under ``prefix/``: one listing, then one bulk DELETE per
        1,000 keys found (none when there is nothing to remove)."""
        self.delete(list(self.sizes(prefix)))

    def sizes(self, prefix: str) -> dict[str, int]:
        """``{key: size}`` under the folder ``prefix`` (S3 listings are always fresh)."""
        import obstore

        with self._errors(prefix):
            found: dict[str, int] = {}
            for batch in obstore.list(self.store, prefix=prefix.rstrip("/") + "/"):
                found.update((meta["path"], int(meta["size"])) for meta in batch)
        return found

    def zarr_location(self, key: str) -> tuple[Any, dict[str, Any] | None]:
        """A ``zarr.storage.ObjectStore`` rooted at the folder (no fsspec in between).

        Rooted there, not a path inside the root's store: zarr would write group
        metadata into every parent folder of an array it creates.
        """
        from zarr.storage import ObjectStore

        return ObjectStore(self._store(_join(self.prefix, key))), None


def _s3_code(message: str) -> str:
    """The S3 error code in an obstore message (``SignatureDoesNotMatch``...), or its status."""
    for marker in ("<Code>", "status code: "):
        if marker in message:
            return message.split(marker, 1)[1].split("<", 1)[0].split(":", 1)[0].strip()
    return message.splitlines()[0][:200]
