"""Training data: find the files, read rows, check them, shape them for trl.

Rows are read in Python rather than handed straight to a columnar reader so a
bad row can be named by file and line and skipped instead of failing the job;
each usable row becomes one of trl's native shapes (prompt/completion,
conversational prompt/completion, or text), and trl does the tokenizing.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from service.errors import DataError
from service.manifest.spec import DataSpec
from service.storage import S3Storage, fetch_cached, sha256_file, split_s3_uri

log = structlog.get_logger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
CHAT_ROLES = {"system", "user", "assistant", "tool"}


def alpaca_prompt(row: dict[str, Any]) -> str:
    if row.get("input"):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


@dataclass
class SourceFile:
    path: Path
    origin: str  # what the user named: a local path or an s3:// URI
    etag: str = ""


@dataclass
class LoadedSplit:
    rows: list[dict[str, Any]]
    files: list[SourceFile]
    rows_read: int = 0
    rows_skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    first_bad: str | None = None


@dataclass
class Dataset:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str
    report: dict[str, Any]


# --------------------------------------------------------------------------- locating


def resolve_files(spec_uri: str, cache_dir: Path) -> list[SourceFile]:
    """Expand a local path/glob/dir or an s3:// object/prefix/glob into local files."""
    if spec_uri.startswith("s3://"):
        return _fetch_s3(spec_uri, cache_dir)
    path = Path(spec_uri).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
            return [SourceFile(path, spec_uri)]  # datasets' save_to_disk layout
        files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
    elif any(ch in spec_uri for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise DataError(f"{spec_uri}: no data files found")
    return [SourceFile(p, str(p)) for p in files]


def _fetch_s3(uri: str, cache_dir: Path) -> list[SourceFile]:
    import fnmatch

    bucket, key = split_s3_uri(uri)
    has_glob = any(ch in key for ch in "*?[")
    prefix = key.split("*")[0].split("?")[0].split("[")[0] if has_glob else key
    store = S3Storage(f"s3://{bucket}/")
    objects = store.list_objects(prefix)
    if has_glob:
        objects = [o for o in objects if fnmatch.fnmatchcase(o.key, key)]
    elif not key.endswith("/") and any(o.key == key for o in objects):
        objects = [o for o in objects if o.key == key]
    objects = [o for o in objects if Path(o.key).suffix in SUFFIXES]
    if not objects:
        raise DataError(f"{uri}: no data files found")
    target = cache_dir / "data" / bucket
    fetch_cached(store, objects, target)
    return [
        SourceFile(target / o.key, f"s3://{bucket}/{o.key}", o.etag)
        for o in sorted(objects, key=lambda o: o.key)
    ]


# --------------------------------------------------------------------------- reading


def _read_rows(src: SourceFile) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row); a location names the file and line or row number."""
    path = src.path
    if path.is_dir():
        import datasets

        for i, row in enumerate(datasets.load_from_disk(str(path))):
            yield f"{src.origin} row {i + 1}", row
        return
    kind = SUFFIXES.get(path.suffix)
    if kind == "json":
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{src.origin} line {err.lineno}: invalid JSON: {err.msg}"
                ) from None
            for i, row in enumerate(rows):
                yield f"{src.origin} item {i + 1}", row
            return
        kind = "jsonl"
    if kind == "jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{src.origin} line {lineno}", json.loads(line)
                except json.JSONDecodeError as err:
                    yield f"{src.origin} line {lineno}", ValueError(f"invalid JSON: {err.msg}")
    elif kind == "csv":
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"{src.origin} line {reader.line_num}", row
    elif kind == "parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{src.origin} row {i + 1}", row
    else:
        raise DataError(f"{src.origin}: unsupported file type (use {', '.join(SUFFIXES)})")


# --------------------------------------------------------------------------- shaping


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing or empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return value


def shape_row(raw: Any, spec: DataSpec) -> dict[str, Any]:
    """Turn one raw row into trl's form for this format, or raise ValueError(reason)."""
    if isinstance(raw, Exception):
        raise raw
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object, got {type(raw).__name__}")
    fmt = spec.format
    if fmt == "alpaca":
        instruction = _text(raw, "instruction")
        row = {"instruction": instruction, "input": _text(raw, "input", required=False)}
        return {"prompt": alpaca_prompt(row), "completion": _text(raw, "output")}
    if fmt == "prompt_completion":
        return {"prompt": _text(raw, "prompt"), "completion": _text(raw, "completion")}
    if fmt == "text":
        return {"text": _text(raw, "text")}
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("missing or empty 'messages' list")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise ValueError(f"messages[{i}] needs a role in {sorted(CHAT_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}].content must be a string")
        clean.append({"role": m["role"], "content": m["content"]})
    if clean[-1]["role"] != "assistant" or len(clean) < 2:
        raise ValueError("a chat row must end with an assistant message after a prompt")
    if spec.loss_on_completion_only:
        return {"prompt": clean[:-1], "completion": clean[-1:]}
    return {"messages": clean}


def load_split(uri: str, spec: DataSpec, cache_dir: Path) -> LoadedSplit:
    files = resolve_files(uri, cache_dir)
    split = LoadedSplit(rows=[], files=files)
    for src in files:
        for where, raw in _read_rows(src):
            split.rows_read += 1
            try:
                shaped = shape_row(raw, spec)
            except ValueError as err:
                split.rows_skipped += 1
                reason = str(err)
                split.skip_reasons[reason] = split.skip_reasons.get(reason, 0) + 1
                if split.first_bad is None:
                    split.first_bad = f"{where}: {reason}"
                continue
            split.rows.append({"_raw": raw, **shaped})
    if split.rows_skipped:
        log.warning(
            "data_rows_skipped",
            uri=uri,
            skipped=split.rows_skipped,
            read=split.rows_read,
            first=split.first_bad,
            reasons=split.skip_reasons,
        )
    if not split.rows:
        detail = f"; first bad row: {split.first_bad}" if split.first_bad else ""
        raise DataError(f"{uri}: no usable {spec.format} rows in {split.rows_read} read{detail}")
    return split


def _row_hash(raw: Any) -> int:
    canonical = json.dumps(raw, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(canonical).digest()[:8], "big")


def holdout_split(
    rows: list[dict[str, Any]], fraction: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out rows by a hash of their content: a row stays on its side of the split
    when rows are added, so evaluation does not drift as the data grows."""
    if fraction <= 0:
        return rows, []
    threshold = int(fraction * 2**64)
    hashes = [_row_hash(r["_raw"]) for r in rows]
    train = [r for r, h in zip(rows, hashes, strict=True) if h >= threshold]
    held = [r for r, h in zip(rows, hashes, strict=True) if h < threshold]
    if not held and len(rows) > 1:  # tiny data: still evaluate on one row
        i = min(range(len(rows)), key=hashes.__getitem__)
        held, train = [rows[i]], rows[:i] + rows[i + 1 :]
    return train, held


def fingerprint(files: list[SourceFile]) -> str:
    digest = hashlib.sha256()
    for src in files:
        digest.update(src.origin.encode())
        paths = sorted(src.path.rglob("*")) if src.path.is_dir() else [src.path]
        for p in paths:
            if p.is_file():
                digest.update(sha256_file(p).encode())
    return digest.hexdigest()


def load_dataset(spec: DataSpec, cache_dir: Path) -> Dataset:
    train_split = load_split(spec.train, spec, cache_dir)
    eval_split = load_split(spec.eval, spec, cache_dir) if spec.eval else None
    if eval_split is not None:
        train_rows, eval_rows = train_split.rows, eval_split.rows
    else:
        train_rows, eval_rows = holdout_split(train_split.rows, spec.eval_fraction)
    if not train_rows:
        raise DataError(f"{spec.train}: no training rows left after holding out eval rows")
    files = train_split.files + (eval_split.files if eval_split else [])
    report = {
        "format": spec.format,
        "files": [{"uri": f.origin, "etag": f.etag} for f in files],
        "rows_read": train_split.rows_read + (eval_split.rows_read if eval_split else 0),
        "rows_skipped": train_split.rows_skipped + (eval_split.rows_skipped if eval_split else 0),
        "first_skipped": train_split.first_bad or (eval_split.first_bad if eval_split else None),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
    }
    strip = [{k: v for k, v in r.items() if k != "_raw"} for r in train_rows]
    strip_eval = [{k: v for k, v in r.items() if k != "_raw"} for r in eval_rows]
    return Dataset(train=strip, eval=strip_eval, fingerprint=fingerprint(files), report=report)
