"""Where a manifest comes from, and how it becomes a validated FineTuneJob.

Precedence, highest first: ``--manifest PATH|s3://...`` on the command line, the
inline document in ``SPOTLORA_MANIFEST``, the URI in ``SPOTLORA_MANIFEST_URI``.
``--set dotted.path=value`` overrides are applied to the raw document before
validation, so they are checked exactly like the file itself.

Whatever the source, the bytes enter through one gate: at most ``MAX_MANIFEST_BYTES``, UTF-8,
and a YAML document whose expansion (aliases, merge keys) and nesting are bounded before
anything is built. A hostile or corrupt manifest is then an exit 2 within a second, not minutes
of parsing and gigabytes of memory, nor a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import yaml
from pydantic import ValidationError

from service.errors import ManifestError
from service.manifest.spec import SECRET_ERROR_TYPES, FineTuneJob
from service.uris import S3_PREFIX, check_storage_uri, parse_s3_uri

log = structlog.get_logger(__name__)

TOP_LEVEL_KEYS = ("apiVersion", "kind", "metadata", "spec")
STDIN = "-"  # --manifest - reads the manifest from standard input

# A manifest is a few KB; the limits leave two orders of magnitude of room and are checked
# before parsing: PyYAML took 150 s and 1.9 GB of memory for a 50 MB manifest.
MAX_MANIFEST_BYTES = 256 * 1024
# Values (scalars, lists, mappings) of the document once every alias and merge key is expanded.
MAX_MANIFEST_NODES = 10_000
# The schema nests five levels; the C parser would crash the process on ~100,000.
MAX_MANIFEST_DEPTH = 64
# An undecodable byte in an environment variable reaches Python as a lone surrogate.
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_ECHO_MAX_CHARS = 100

ReadUri = Callable[[str], bytes | str]


@dataclass(frozen=True)
class LoadedManifest:
    job: FineTuneJob
    origin: str  # where it came from, for logs and run.json

    @property
    def sha256(self) -> str:
        """Hash of the resolved manifest: equal jobs hash equal, whatever the formatting."""
        canonical = json.dumps(self.job.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _too_large(origin: str) -> ManifestError:
    return ManifestError(
        f"{origin}: larger than {MAX_MANIFEST_BYTES // 1024} KiB; a manifest is a few KB "
        "(data goes in data.train, not in the manifest)"
    )


def _line_column(prefix: str) -> tuple[int, int]:
    """1-based line and column of the character just after ``prefix``."""
    return prefix.count("\n") + 1, len(prefix) - prefix.rfind("\n")


def decode_manifest(raw: bytes | str, origin: str) -> str:
    """The one gate where manifest bytes become text: at most MAX_MANIFEST_BYTES of UTF-8.

    ``raw`` is text when it came from the environment: Python has already decoded it, turning
    each byte that was not UTF-8 into a lone surrogate, which is found here instead of deep in
    the parser.
    """
    if isinstance(raw, str):
        bad = _SURROGATE.search(raw)
        if bad:
            line, column = _line_column(raw[: bad.start()])
            code = ord(bad.group())
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise ManifestError(
                f"{origin}: not UTF-8 text: {what} at line {line}, column {column}; "
                "a manifest is YAML or JSON in UTF-8"
            )
        if len(raw) > MAX_MANIFEST_BYTES and len(raw.encode()) > MAX_MANIFEST_BYTES:
            raise _too_large(origin)
        return raw.removeprefix("\ufeff")
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _too_large(origin)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line, column = _line_column(raw[: err.start].decode("utf-8"))
        raise ManifestError(
            f"{origin}: not UTF-8 text: byte 0x{raw[err.start]:02x} at line {line}, column "
            f"{column} (byte offset {err.start}); a manifest is YAML or JSON in UTF-8"
        ) from None


def read_manifest_bytes(uri: str) -> bytes:
    """Fetch a manifest from a path or s3:// URI, holding at most MAX_MANIFEST_BYTES + 1 bytes:
    an oversized one is refused by decode_manifest without ever being read whole."""
    if uri.startswith(S3_PREFIX):
        return _read_s3_manifest(uri)
    if uri == STDIN:  # `envsubst < job.yaml | spotlora run -f -`
        return sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
    try:
        # Not only regular files: `-f <(envsubst < job.yaml)` is a pipe, and the bounded read
        # makes even /dev/zero safe.
        with Path(uri).expanduser().open("rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"{uri}: manifest not found") from None
    except IsADirectoryError:
        raise ManifestError(f"{uri}: is a directory, not a manifest file") from None
    except OSError as err:
        raise ManifestError(f"{uri}: cannot read the manifest: {err.strerror or err}") from None


def _read_s3_manifest(uri: str) -> bytes:
    from service.storage import S3Storage  # boto3 only for an s3:// manifest

    try:
        bucket, key = parse_s3_uri(uri)
    except ValueError as err:
        raise ManifestError(f"{uri}: {err}") from None
    store = S3Storage(f"s3://{bucket}/")
    info = store.head(key)
    if info is None:
        raise ManifestError(f"{uri}: manifest not found")
    if info.size > MAX_MANIFEST_BYTES:  # refused before the GET
        raise _too_large(uri)
    return store.read_bytes(key)


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader (libyaml's parser when present), turning what its constructors let
    escape for a malformed value into a YAML error with a position: a date such as 2024-13-45
    or an integer past Python's 4300 digits raise ValueError, ``!!bool maybe`` a KeyError,
    ``!!timestamp x`` an AttributeError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (yaml.YAMLError, RecursionError, MemoryError):
            raise
        except Exception as err:
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value: {err}", node.start_mark
            ) from None


def _refused(origin: str, event: yaml.Event, why: str) -> ManifestError:
    mark = event.start_mark
    where = f" at line {mark.line + 1}" if mark is not None else ""
    return ManifestError(f"{origin}: refused{where}: {why}")


def check_expansion(text: str, origin: str) -> None:
    """Refuse a document that would expand past MAX_MANIFEST_NODES values or nest deeper than
    MAX_MANIFEST_DEPTH, before any of it is built.

    Aliases make YAML a compression format: nine levels of ``<<: [*x, *x, ...]`` are a few
    hundred bytes that safe_load expands to 9**9 mapping entries (minutes and gigabytes). This
    counts on the parser's event stream, one pass whatever the expansion: the expanded size of
    each anchored node is remembered when the node ends, and an alias (a merge key's included)
    adds that size instead of walking the node again. The pass never recurses, so deep nesting
    is refused here too, before the composer (recursive; in C, a crash) sees it.
    """
    expanded = 0
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, values expanded before the node)
    sizes: dict[str, int] = {}  # anchor -> expanded size of its (ended) node
    for event in yaml.parse(text, Loader=_Loader):
        anchor = getattr(event, "anchor", None)
        is_open = anchor is not None and any(anchor == a for a, _ in open_nodes)
        if isinstance(event, yaml.AliasEvent):
            if is_open:
                raise _refused(origin, event, f"alias *{anchor} refers to itself")
            expanded += sizes.get(anchor or "", 1)  # undefined: the composer names it
            continue
        if anchor is not None and (is_open or anchor in sizes):
            raise _refused(origin, event, f"anchor &{anchor} is defined twice")
        if isinstance(event, yaml.ScalarEvent):
            expanded += 1
            if anchor is not None:
                sizes[anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            open_nodes.append((anchor, expanded))
            expanded += 1
            if len(open_nodes) > MAX_MANIFEST_DEPTH:
                raise _refused(origin, event, f"nested deeper than {MAX_MANIFEST_DEPTH} levels")
        elif isinstance(event, yaml.CollectionEndEvent):
            start_anchor, before = open_nodes.pop()
            if start_anchor is not None:
                sizes[start_anchor] = expanded - before
        if expanded > MAX_MANIFEST_NODES:
            raise _refused(
                origin,
                event,
                f"expands to more than {MAX_MANIFEST_NODES:,} values (aliases '*' or merge keys "
                "'<<' repeating a node); a manifest has a few hundred",
            )


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    if isinstance(err, yaml.reader.ReaderError):
        line, column = _line_column(text[: err.position])
        return f" at line {line}, column {column}: character #x{err.character:04x}: {err.reason}"
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(err, 'problem', None) or err}"


def load_yaml(text: str, origin: str) -> Any:
    """yaml.safe_load with bounded expansion; a YAML error propagates for the caller to word."""
    check_expansion(text, origin)
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain data only
    except RecursionError:  # not expected below MAX_MANIFEST_DEPTH; never a traceback
        raise ManifestError(f"{origin}: nested too deeply") from None


def parse_document(text: str, origin: str) -> dict[str, Any]:
    """YAML is a superset of JSON, so one parser reads both."""
    try:
        doc = load_yaml(text, origin)
    except yaml.YAMLError as err:
        raise ManifestError(f"{origin}: not valid YAML/JSON{_yaml_problem(err, text)}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{origin}: expected a mapping with {', '.join(TOP_LEVEL_KEYS)}")
    return doc


def apply_overrides(doc: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; paths are relative to ``spec`` unless they start
    with a top-level key. Values are parsed as YAML scalars (``1e-4``, ``true``, ``[a, b]``)."""
    for item in overrides:
        path, sep, raw = item.partition("=")
        if not sep or not path.strip():
            raise ManifestError(f"--set {item!r}: expected dotted.path=value")
        keys = path.strip().split(".")
        if keys[0] not in TOP_LEVEL_KEYS:
            keys = ["spec", *keys]
        origin = f"--set {path.strip()}"
        try:
            value = load_yaml(decode_manifest(raw, origin), origin)
        except yaml.YAMLError:
            value = raw
        node = doc
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ManifestError(f"--set {item!r}: {key!r} is not a mapping")
            node = child
        node[keys[-1]] = value
    return doc


def format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: invalid manifest ({err.error_count()} problem(s))"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(document)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `spotlora schema`)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        got = e.get("input")
        suffix = ""
        if (
            e["type"] not in ("missing", "extra_forbidden", *SECRET_ERROR_TYPES)
            and not isinstance(got, dict | list)
            and repr(got) not in msg
        ):
            shown = repr(got)
            if len(shown) > _ECHO_MAX_CHARS:
                shown = shown[:_ECHO_MAX_CHARS] + "..."
            suffix = f" (got {shown})"
        lines.append(f"  {where}: {msg}{suffix}")
    return "\n".join(lines)


def validate_document(doc: dict[str, Any], origin: str) -> FineTuneJob:
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(format_validation_error(err, origin)) from None


def resolve_source(
    cli_manifest: str | None, env_inline: str | None, env_uri: str | None
) -> tuple[str, str | None]:
    """Return (origin, inline text or None when origin is a path/URI to read)."""
    given = [
        ("--manifest", cli_manifest),
        ("SPOTLORA_MANIFEST", env_inline),
        ("SPOTLORA_MANIFEST_URI", env_uri),
    ]
    present = [(name, value) for name, value in given if value]
    if not present:
        raise ManifestError(
            "no manifest given: pass --manifest PATH|s3://..., or set SPOTLORA_MANIFEST "
            "(inline YAML/JSON) or SPOTLORA_MANIFEST_URI"
        )
    name, value = present[0]
    if len(present) > 1:
        log.info("manifest_source_chosen", chosen=name, ignored=[n for n, _ in present[1:]])
    if name == "SPOTLORA_MANIFEST":
        return "$SPOTLORA_MANIFEST", value
    assert value is not None
    check_manifest_uri(name, value)
    return value, None


def check_manifest_uri(name: str, uri: str) -> None:
    """A manifest is one file: a local path or an s3:// object (not a prefix)."""
    try:
        check_storage_uri(uri)
        if uri.startswith(S3_PREFIX) and parse_s3_uri(uri)[1].rpartition("/")[2] == "":
            raise ValueError("names a prefix, not a file: write s3://bucket/path/job.yaml")
    except ValueError as err:
        raise ManifestError(f"{name} {uri!r}: {err}") from None


def load_manifest(
    *,
    cli_manifest: str | None,
    env_inline: str | None,
    env_uri: str | None,
    overrides: Sequence[str] = (),
    read_uri: ReadUri = read_manifest_bytes,
) -> LoadedManifest:
    """Find, parse, override and validate the job. ``read_uri`` fetches a path or s3:// URI
    (bytes; text is accepted from test doubles) and goes through the same gate as the rest."""
    origin, raw = resolve_source(cli_manifest, env_inline, env_uri)
    text = decode_manifest(read_uri(origin) if raw is None else raw, origin)
    doc = apply_overrides(parse_document(text, origin), overrides)
    return LoadedManifest(job=validate_document(doc, origin), origin=origin)
