"""What every store offers: the protocol, object info, and key arithmetic."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class PreconditionFailed(Exception):
    """A conditional write lost: someone else wrote the key first or since."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    modified_unix: float = 0.0  # as listed (S3 LastModified, a file's mtime); 0 from head


class Storage(Protocol):
    uri: str

    def read_bytes(self, key: str) -> bytes: ...

    def write_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        """Write and return the new version tag. Raises PreconditionFailed when
        ``if_none_match`` and the key exists, or ``if_match`` differs from its tag."""
        ...

    def upload_file(self, local: Path, key: str) -> None: ...

    def download_file(self, key: str, local: Path) -> None: ...

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]: ...

    def head(self, key: str) -> ObjectInfo | None: ...

    def delete(self, keys: list[str]) -> None: ...

    def child(self, prefix: str) -> Storage: ...


def join(*parts: str) -> str:
    """Join key parts with single slashes (keys are relative: no leading slash)."""
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def uri_join(base: str, *parts: str) -> str:
    """Extend a storage URI (s3://bucket/prefix or a local path), keeping its root."""
    return base.rstrip("/") + "/" + join(*parts) if parts else base


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class file_lock:
    """An advisory lock (flock) on ``path`` held for the block. The kernel releases it when
    the process dies, so a SIGKILL never leaves it held (a lock file made with O_EXCL would
    outlive its holder and block every later writer). The holder deletes the file before
    unlocking, and a waiter that then gets the lock of a deleted file tries again: no two
    holders, and no lock files left in a store beside its objects."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        import fcntl

        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self._fd = fd
                    return
            except FileNotFoundError:
                pass  # deleted by the holder we waited for: lock the new file
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        self.path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def record_bytes(record: Any) -> bytes:
    """A record as strict JSON: a NaN or an infinity (a diverged loss, a bad price) becomes
    null, since ``json.dumps`` would write ``NaN``/``Infinity``, which no JSON reader takes.
    Values JSON has no type for are written as their ``str``."""
    return json.dumps(_finite(record), indent=1, default=str, allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
