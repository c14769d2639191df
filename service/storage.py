"""Object storage behind one small protocol: a local directory or an S3 prefix.

Keys are relative, '/'-separated paths under the storage root. Writes that
other writers may race (the checkpoint pointer, the run record) take a
precondition, so a stale pod cannot overwrite what a newer pod committed:
S3 conditional writes (If-None-Match / If-Match, answered with 412) on S3 and
an equivalent content-version check on local disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from service.errors import DependencyError
from service.uris import parse_s3_uri

log = structlog.get_logger(__name__)

# botocore counts the first try too; AWS_MAX_ATTEMPTS overrides, as for the AWS CLI.
S3_MAX_ATTEMPTS = int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
MULTIPART_THRESHOLD_BYTES = 64 * 2**20
MULTIPART_CHUNK_BYTES = 64 * 2**20
TRANSFER_CONCURRENCY = 8


class PreconditionFailed(Exception):
    """A conditional write lost: someone else wrote the key first or since."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str


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


def open_storage(uri: str) -> Storage:
    if uri.startswith("s3://"):
        return S3Storage(uri)
    if "://" in uri:  # the manifest and the CLI refuse other schemes where they enter
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path or s3://")
    return LocalStorage(Path(uri).expanduser())


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key. URIs from users are checked where they enter (the manifest, the CLI);
    one that fails here is a bug, not bad input."""
    try:
        return parse_s3_uri(uri)
    except ValueError as err:
        raise ValueError(f"{uri!r}: {err}") from None


# --------------------------------------------------------------------------- local


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class LocalStorage:
    """A directory. Writes go to a temporary file then rename, so readers never see
    a half-written object; conditional writes take a lock file for the check-and-set."""

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
        with _lock(path.with_name(f".{path.name}.lock")):
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
                out.append(ObjectInfo(key=key, size=path.stat().st_size, etag=""))
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


class _lock:
    """An exclusive lock file (O_EXCL), enough for writers on one filesystem."""

    def __init__(self, path: Path, timeout_seconds: float = 30) -> None:
        self.path = path
        self.timeout_seconds = timeout_seconds

    def __enter__(self) -> None:
        import time

        deadline = time.monotonic() + self.timeout_seconds
        while True:
            try:
                os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                return
            except FileExistsError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {self.path} held too long") from None
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- S3


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    # Retries with backoff come from botocore's standard mode; endpoint, region and
    # credentials from boto3's usual chain (AWS_ENDPOINT_URL_S3 for S3-compatible stores).
    config = Config(
        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=TRANSFER_CONCURRENCY * 2,
    )
    return boto3.session.Session().client("s3", config=config)


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD_BYTES,
        multipart_chunksize=MULTIPART_CHUNK_BYTES,
        max_concurrency=TRANSFER_CONCURRENCY,
    )


class S3Storage:
    def __init__(self, uri: str, client: Any = None) -> None:
        self.bucket, prefix = split_s3_uri(uri if uri.endswith("/") else uri + "/")
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
        self.client = client or _s3_client()

    def _key(self, key: str) -> str:
        return join(self.prefix, key)

    def _call(self, what: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"s3://{self.bucket}/{kwargs.get('Key', '')}") from None
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                raise PreconditionFailed(f"s3://{self.bucket}/{kwargs.get('Key', '')}") from None
            raise DependencyError(
                f"S3 {what} s3://{self.bucket}/{kwargs.get('Key', kwargs.get('Prefix', ''))} "
                f"failed: {code or status}: {err.response.get('Error', {}).get('Message', err)}"
            ) from None
        except BotoCoreError as err:
            raise DependencyError(
                f"S3 {what} s3://{self.bucket}/ failed after {S3_MAX_ATTEMPTS} attempts: {err}"
            ) from None

    def read_bytes(self, key: str) -> bytes:
        resp = self._call("read", self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return resp["Body"].read()

    def write_bytes(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        extra: dict[str, str] = {}
        if if_none_match:
            extra["IfNoneMatch"] = "*"
        if if_match is not None:
            extra["IfMatch"] = if_match
        try:
            resp = self._call(
                "write",
                self.client.put_object,
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                **extra,
            )
        except PreconditionFailed:
            # botocore retries a write whose response was lost; the retry of a conditional
            # write then meets its own first attempt. What is there decides: the bytes this
            # process meant to write mean success, anything else a real conflict.
            tag = self._tag_if_holding(key, data)
            if tag is None:
                raise
            log.info("s3_conditional_write_already_applied", key=self._key(key))
            return tag
        return resp["ETag"]

    def _tag_if_holding(self, key: str, data: bytes) -> str | None:
        try:
            resp = self._call(
                "read", self.client.get_object, Bucket=self.bucket, Key=self._key(key)
            )
        except FileNotFoundError:
            return None
        return str(resp["ETag"]) if resp["Body"].read() == data else None

    def upload_file(self, local: Path, key: str) -> None:
        self._call(
            "upload",
            self.client.upload_file,
            Filename=str(local),
            Bucket=self.bucket,
            Key=self._key(key),
            Config=_transfer_config(),
        )

    def download_file(self, key: str, local: Path) -> None:
        from boto3.exceptions import S3TransferFailedError

        local.parent.mkdir(parents=True, exist_ok=True)
        part = local.with_name(f"{local.name}.{os.getpid()}.part")
        try:
            self._call(
                "download",
                self.client.download_file,
                Bucket=self.bucket,
                Key=self._key(key),
                Filename=str(part),
                Config=_transfer_config(),
            )
        except S3TransferFailedError as err:
            raise DependencyError(
                f"S3 download s3://{self.bucket}/{self._key(key)}: {err}"
            ) from None
        os.replace(part, local)

    def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._key(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        out = []
        # Pages are fetched lazily, so the whole walk runs inside _call's error mapping.
        pages = self._call(
            "list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=full))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self.prefix) + 1 :] if self.prefix else obj["Key"]
                out.append(ObjectInfo(key=key, size=obj["Size"], etag=obj["ETag"]))
        return out

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call(
                "head", self.client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except FileNotFoundError:
            return None
        return ObjectInfo(key=key, size=resp["ContentLength"], etag=resp["ETag"])

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start : start + 1000]]
            self._call(
                "delete",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    def child(self, prefix: str) -> S3Storage:
        return S3Storage(f"s3://{self.bucket}/{join(self.prefix, prefix)}/", client=self.client)


CACHE_INDEX = ".spotlora-etags.json"
CACHE_LOCK = ".spotlora-fetch.lock"


def fetch_cached(store: Storage, objects: list[ObjectInfo], target: Path) -> list[ObjectInfo]:
    """Download ``objects`` under ``target`` in parallel, remembering the ETag each came
    with: an interrupted fetch resumes with what is missing, and a cache that still
    matches costs only the listing. Returns the objects that were downloaded."""
    from concurrent.futures import ThreadPoolExecutor

    target.mkdir(parents=True, exist_ok=True)
    # The ranks of one node share its cache: the first to take the lock downloads, the others
    # then find the cache current. Never two writers on one path.
    with _file_lock(target / CACHE_LOCK):
        index_path = target / CACHE_INDEX
        etags: dict[str, str] = json.loads(index_path.read_text()) if index_path.is_file() else {}
        todo = [
            o
            for o in objects
            if etags.get(o.key) != o.etag
            or not (target / o.key).is_file()
            or (target / o.key).stat().st_size != o.size
        ]
        if todo:
            with ThreadPoolExecutor(TRANSFER_CONCURRENCY) as pool:
                list(pool.map(lambda o: store.download_file(o.key, target / o.key), todo))
            etags.update({o.key: o.etag for o in todo})
            tmp = index_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(etags, indent=1))
            os.replace(tmp, index_path)
    return todo


class _file_lock:
    """An advisory lock (flock) held for the block: released by the kernel when the
    process dies, so a SIGKILL never leaves a cache locked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def __enter__(self) -> None:
        import fcntl

        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


def download_prefix(storage: Storage, local_dir: Path) -> Path:
    """Copy every object under a storage root into a local directory."""
    objects = storage.list_objects()
    if not objects:
        raise FileNotFoundError(f"{storage.uri}: nothing there")
    for obj in objects:
        storage.download_file(obj.key, local_dir / obj.key)
    return local_dir
