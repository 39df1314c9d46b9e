"""What to do when a store cannot be used: the fix that fits the cause and the kind of store.

A local folder's failure never talks about credentials; an object store's names the
environment variables and profile the S3 clients read, and tells a missing credential
from a refused one and from a missing bucket.
"""

from __future__ import annotations

import errno

#: How users hand credentials to the S3 clients (s3fs, obstore): what a message names.
S3_CREDENTIALS = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, a profile of "
    "~/.aws/credentials) in the job's environment, or use the machine's instance role"
)
_MISSING = ("nocredentialserror", "unable to locate credentials", "no credentials",
            "partialcredentialserror", "credentials not found")
_REFUSED = ("accessdenied", "access denied", "invalidaccesskeyid", "signaturedoesnotmatch",
            "forbidden", "403", "permissionerror", "permission denied")
_NO_BUCKET = ("nosuchbucket", "bucket does not exist", "the specified bucket")


def is_local(url: str) -> bool:
    """True for a path on this machine (no scheme, or ``file://``)."""
    return "://" not in url or url.startswith("file://")


def _cause(exc: BaseException) -> str:
    """``exc``'s type and message, lower-cased, for matching."""
    return f"{type(exc).__name__} {exc}".lower()


def local_fix(exc: BaseException, key: str) -> str:
    """The fix for a local folder that cannot be used (``key``: the setting naming it)."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, PermissionError) or code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"this user may not write there (a read-only folder or disk). Fix: make it "
                f"writable, or choose another {key}")
    if code == errno.ENOSPC:
        return f"the disk is full. Fix: free space, or choose another {key}"
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        return f"a file is in the way of the folder. Fix: move the file, or choose another {key}"
    return f"the folder cannot be created or written. Fix: check its path, or choose another {key}"


def remote_fix(exc: BaseException, key: str, options_key: str) -> str:
    """The fix for an object store that cannot be used (``options_key``: its storage options)."""
    cause = _cause(exc)
    if any(word in cause for word in _MISSING):
        return (f"no credentials were found. Fix: {S3_CREDENTIALS} (or give "
                f"+{options_key}.key / .secret)")
    if any(word in cause for word in _NO_BUCKET):
        return f"the bucket does not exist. Fix: create it, or choose another {key}"
    if any(word in cause for word in _REFUSED):
        return (f"the store refused these credentials. Fix: check AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY / AWS_PROFILE (or {options_key}) and that they may "
                f"write to {key}")
    return (f"check the endpoint ({options_key}.endpoint_url), the network, and that the "
            f"bucket exists and has space; or choose another {key}")


def store_fix(url: str, exc: BaseException, key: str, options_key: str) -> str:
    """Why the store at ``url`` (the setting ``key``) failed with ``exc``, and the fix."""
    return local_fix(exc, key) if is_local(url) else remote_fix(exc, key, options_key)
