"""Where a manifest comes from, and how it becomes a validated FineTuneJob.

Precedence, highest first: ``--manifest PATH|s3://...`` on the command line, the
inline document in ``SPOTLORA_MANIFEST``, the URI in ``SPOTLORA_MANIFEST_URI``.
``--set dotted.path=value`` overrides are applied to the raw document before
validation, so they are checked exactly like the file itself.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
import yaml
from pydantic import ValidationError

from service.errors import ManifestError
from service.manifest.spec import FineTuneJob

log = structlog.get_logger(__name__)

TOP_LEVEL_KEYS = ("apiVersion", "kind", "metadata", "spec")


@dataclass(frozen=True)
class LoadedManifest:
    job: FineTuneJob
    origin: str  # where it came from, for logs and run.json

    @property
    def sha256(self) -> str:
        """Hash of the resolved manifest: equal jobs hash equal, whatever the formatting."""
        canonical = json.dumps(self.job.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()


def parse_document(text: str, origin: str) -> dict[str, Any]:
    """YAML is a superset of JSON, so one parser reads both."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ManifestError(f"{origin}: not valid YAML/JSON{where}: {problem}") from None
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
        try:
            value = yaml.safe_load(raw)
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
            e["type"] not in ("missing", "extra_forbidden")
            and not isinstance(got, dict | list)
            and repr(got) not in msg
        ):
            suffix = f" (got {got!r})"
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
    return value, None


def load_manifest(
    *,
    cli_manifest: str | None,
    env_inline: str | None,
    env_uri: str | None,
    overrides: Sequence[str] = (),
    read_uri: Callable[[str], str],
) -> LoadedManifest:
    """Find, parse, override and validate the job. ``read_uri`` fetches a path or s3:// URI."""
    origin, text = resolve_source(cli_manifest, env_inline, env_uri)
    if text is None:
        text = read_uri(origin)
    doc = apply_overrides(parse_document(text, origin), overrides)
    return LoadedManifest(job=validate_document(doc, origin), origin=origin)
