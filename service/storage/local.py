"""A directory as a store: atomic writes by rename, conditional writes under a file lock."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from service.storage.base import ObjectInfo, PreconditionFailed, file_lock, sha256_file


class LocalStorage:
    """A directory. Writes go to a temporary file then rename, so readers never see
    a half-written object; conditional writes hold a lock (flock) for the check-and-set."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in (path, *path.parents):
            raise ValueError(f"key {key!r} escapes {self.root}")
        return path

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}")
        return path.read_bytes()

    def _atomic_write(self, path: Path, writer: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def write_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        path = self._path(key)
        if not if_none_match and if_match is None:
            self._atomic_write(path, lambda f: f.write(data))
            return hashlib.sha256(data).hexdigest()
        path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(path.with_name(f".{path.name}.lock")):
            exists = path.is_file()
            if if_none_match and exists:
                raise PreconditionFailed(f"{self.uri}/{key} exists")
            if if_match is not None and (not exists or sha256_file(path) != if_match):
                raise PreconditionFailed(f"{self.uri}/{key} changed since version {if_match}")
            self._atomic_write(path, lambda f: f.write(data))
        return hashlib.sha256(data).hexdigest()

    def upload_file(self, local: Path, key: str) -> None:
        self._atomic_write(self._path(key), lambda f: shutil.copyfileobj(local.open("rb"), f))

    def download_file(self, key: str, local: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise FileNotFoundError(f"{self.uri}/{key}")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            candidates: Iterator[Path] = iter([base])
        elif base.is_dir():
            candidates = base.rglob("*")
        else:  # a key prefix that is not a whole path segment
            parent = base.parent
            candidates = (p for p in parent.rglob("*") if str(p).startswith(str(base)))
        out = []
        for path in candidates:
            if path.is_file() and not path.name.endswith((".part", ".lock")):
                key = path.relative_to(self.root).as_posix()
                stat = path.stat()
                out.append(ObjectInfo(key, stat.st_size, "", stat.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.is_file():
            return None
        return ObjectInfo(key=key, size=path.stat().st_size, etag=sha256_file(path))

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self._path(key).unlink(missing_ok=True)

    def child(self, prefix: str) -> LocalStorage:
        return LocalStorage(self.root / prefix)
