"""An S3 prefix as a store, through boto3: botocore's standard retries, the transfer manager
for multipart, conditional writes that survive a lost response."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import structlog

from service.errors import DependencyError
from service.storage.base import ObjectInfo, PreconditionFailed, join
from service.uris import parse_s3_uri

log = structlog.get_logger(__name__)

# botocore counts the first try too; AWS_MAX_ATTEMPTS overrides, as for the AWS CLI.
S3_MAX_ATTEMPTS = int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
MULTIPART_THRESHOLD_BYTES = 64 * 2**20
MULTIPART_CHUNK_BYTES = 64 * 2**20
TRANSFER_CONCURRENCY = 8


def split_s3_uri(uri: str) -> tuple[str, str]:
    """Bucket and key. URIs from users are checked where they enter (the manifest, the CLI);
    one that fails here is a bug, not bad input."""
    try:
        return parse_s3_uri(uri)
    except ValueError as err:
        raise ValueError(f"{uri!r}: {err}") from None


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
                modified = obj["LastModified"].timestamp()
                out.append(ObjectInfo(key, obj["Size"], obj["ETag"], modified))
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
