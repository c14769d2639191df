"""URIs as users give them (manifest, command line, environment), checked where they enter.

A storage URI is a local path or ``s3://bucket/key``. Anything else used to slip through: an
``ftp://host/x`` was taken for a local directory named ``ftp:``, and an S3 key segment ``..`` is
not resolved by S3 but kept as part of the name, so ``s3://b/jobs/../x`` wrote under a literal
``jobs/../x/``. Local paths keep their ``..``: relative paths are legitimate there and the
filesystem resolves them.

Pure string work, no boto3 and no network, so the manifest and the command line can import it.
Every check raises ValueError with a reason a user can act on; callers add which field or
argument it was.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

S3_PREFIX = "s3://"
HTTP_SCHEMES = ("http", "https")
# S3's naming rules for general purpose buckets (access point aliases follow them too).
BUCKET_MIN_CHARS = 3
BUCKET_MAX_CHARS = 63
S3_KEY_MAX_BYTES = 1024

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
# A newline or NUL in a path is a paste accident, and would break log lines or open().
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Lone surrogates: bytes that were not UTF-8 (Python's surrogateescape); S3 cannot store them.
_SURROGATE = re.compile(r"[\ud800-\udfff]")

STORAGE_HINT = "use a local path or s3://bucket/prefix"


def scheme_of(uri: str) -> str | None:
    """The ``scheme`` of ``scheme://...``, or None for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1) if match else None


def _check_text(value: str) -> None:
    if not value.strip():
        raise ValueError("is empty")
    match = _CONTROL.search(value)
    if match:
        raise ValueError(f"contains the control character {match.group()!r}")


def check_bucket_name(bucket: str) -> None:
    if not bucket:
        raise ValueError("the s3:// URI names no bucket: write s3://bucket/prefix")
    if (
        not BUCKET_MIN_CHARS <= len(bucket) <= BUCKET_MAX_CHARS
        or not _BUCKET.match(bucket)
        or ".." in bucket
        or _IPV4.match(bucket)
    ):
        raise ValueError(
            f"{bucket!r} is not a valid S3 bucket name: use {BUCKET_MIN_CHARS}-{BUCKET_MAX_CHARS} "
            "lower-case letters, digits, '.' and '-', starting and ending with a letter or digit"
        )


def check_s3_key(key: str) -> None:
    """An empty key (the bucket's root) and a trailing '/' (a prefix) are fine; a '.', '..' or
    empty segment is not: S3 stores it literally instead of resolving it as a path would."""
    if _SURROGATE.search(key):
        raise ValueError("the S3 key is not valid UTF-8")
    if len(key.encode()) > S3_KEY_MAX_BYTES:
        raise ValueError(f"the S3 key is longer than {S3_KEY_MAX_BYTES} bytes")
    segments = key.split("/")
    if segments[-1] == "":
        segments.pop()
    for segment in segments:
        if segment in (".", ".."):
            raise ValueError(
                f"the S3 key has a {segment!r} segment: S3 keeps it as part of the object's name "
                "instead of resolving it; write the prefix out in full"
            )
        if not segment:
            raise ValueError("the S3 key has an empty segment ('//')")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key), the key without its leading '/'.

    Parsed by hand rather than with urllib: '?' and '#' are ordinary characters in a key, and
    urlsplit would cut the key there.
    """
    if not uri.startswith(S3_PREFIX):
        raise ValueError("is not an s3:// URI")
    match = _CONTROL.search(uri)
    if match:
        raise ValueError(f"contains the control character {match.group()!r}")
    bucket, _, key = uri[len(S3_PREFIX) :].partition("/")
    check_bucket_name(bucket)
    check_s3_key(key)
    return bucket, key


def check_storage_uri(uri: str) -> str:
    """A local path or an s3:// URI; returned unchanged, so it can serve as a validator."""
    _check_text(uri)
    scheme = scheme_of(uri)
    if scheme is None:
        if uri[:3].lower() == "s3:":
            raise ValueError("'s3:' without '//': write s3://bucket/prefix")
        return uri
    if scheme == "s3":
        parse_s3_uri(uri)
        return uri
    if scheme.lower() == "s3":
        raise ValueError("write the scheme in lower case: s3://")
    raise ValueError(f"unsupported scheme '{scheme}://': {STORAGE_HINT}")


def check_model_source(source: str) -> str:
    """A local directory, an s3:// prefix or a Hub id (``org/name``).

    A Hub id and a relative directory look alike, so which one it is is decided when the model
    is fetched (a directory that exists wins); here only the forms that are neither are refused.
    """
    scheme = scheme_of(source)
    if scheme is not None and scheme.lower() != "s3":
        raise ValueError(
            f"unsupported scheme '{scheme}://': use a local directory, s3://bucket/prefix/ or a "
            "Hugging Face Hub id such as org/name"
        )
    return check_storage_uri(source)


def _split_authority(url: str) -> tuple[str, str, str]:
    """(``scheme://``, authority, rest): by hand, as urlsplit raises on some malformed hosts."""
    head, sep, tail = url.partition("://")
    if not sep:
        head, tail = "", url
    else:
        head += sep
    end = min((i for i in (tail.find(c) for c in "/?#") if i >= 0), default=len(tail))
    return head, tail[:end], tail[end:]


def has_userinfo(url: str) -> bool:
    """True when ``url`` carries ``user[:password]@`` before its host."""
    return "@" in _split_authority(url)[1]


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` removed: safe to log."""
    head, authority, rest = _split_authority(url)
    return head + authority.rpartition("@")[2] + rest


def check_http_url(url: str) -> str:
    """An http(s) base URL with a host; returned unchanged, so it can serve as a validator.

    No credentials (they would be logged and saved with the manifest), and no query or fragment
    (clients append paths to a base URL).
    """
    _check_text(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as err:
        raise ValueError(f"is not a valid URL: {err}") from None
    if parts.scheme not in HTTP_SCHEMES:
        raise ValueError("use an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("credentials in a URL are not allowed: they would be logged")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if parts.query or parts.fragment:
        raise ValueError("a base URL takes no query ('?') or fragment ('#')")
    return url


def check_key_segment(name: str) -> str:
    """One path segment of a key (a run id): no '/', and neither '.' nor '..'."""
    _check_text(name)
    if "/" in name or name in (".", ".."):
        raise ValueError("must be a single name: no '/', and not '.' or '..'")
    return name
