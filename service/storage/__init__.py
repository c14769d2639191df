"""Object storage behind one small protocol: a local directory or an S3 prefix.

Keys are relative, '/'-separated paths under the storage root. Writes that
other writers may race (the checkpoint pointer, the run record) take a
precondition, so a stale pod cannot overwrite what a newer pod committed:
S3 conditional writes (If-None-Match / If-Match, answered with 412) on S3 and
an equivalent content-version check on local disk.
"""

from __future__ import annotations

from pathlib import Path

from service.storage.base import (
    ObjectInfo,
    PreconditionFailed,
    Storage,
    join,
    record_bytes,
    sha256_file,
    uri_join,
)
from service.storage.cache import fetch_cached
from service.storage.local import LocalStorage
from service.storage.s3 import S3Storage, split_s3_uri

__all__ = [
    "LocalStorage",
    "ObjectInfo",
    "PreconditionFailed",
    "S3Storage",
    "Storage",
    "fetch_cached",
    "join",
    "open_storage",
    "record_bytes",
    "sha256_file",
    "split_s3_uri",
    "uri_join",
]


def open_storage(uri: str) -> Storage:
    if uri.startswith("s3://"):
        return S3Storage(uri)
    if "://" in uri:  # the manifest and the CLI refuse other schemes where they enter
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://")
    return LocalStorage(Path(uri).expanduser())
