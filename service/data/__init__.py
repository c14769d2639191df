"""Training data: find the files, read rows, check them, shape them for trl.

``read`` turns bytes into rows (files, lines, decoding), ``shape`` turns rows into trl's
shapes; this module splits train from eval and reports what was kept, cut and skipped.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from service.data.read import (
    LINE_BYTES_PER_CHAR_BOUND,
    MIN_LINE_BYTES,
    BadRow,
    SourceFile,
    read_rows,
    resolve_files,
)
from service.data.shape import fit_row, row_chars_budget, shape_row
from service.errors import DataError
from service.manifest.spec import DataSpec
from service.storage import sha256_file

log = structlog.get_logger(__name__)


def line_bytes_bound(max_length: int) -> int:
    """The longest data line read: room for a row's whole character budget, escaped."""
    return max(MIN_LINE_BYTES, LINE_BYTES_PER_CHAR_BOUND * row_chars_budget(max_length))


@dataclass
class LoadedSplit:
    rows: list[dict[str, Any]]
    files: list[SourceFile]
    rows_read: int = 0
    rows_skipped: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    first_bad: str | None = None
    rows_cut: int = 0
    first_cut: str | None = None


@dataclass
class Dataset:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    fingerprint: str
    report: dict[str, Any]


def load_split(uri: str, spec: DataSpec, cache_dir: Path) -> LoadedSplit:
    files = resolve_files(uri, cache_dir)
    split = LoadedSplit(rows=[], files=files)
    max_chars = row_chars_budget(spec.max_length)
    max_line_bytes = line_bytes_bound(spec.max_length)
    # data.eval and data.eval_fraction are exclusive: a fraction means this is the split
    # the holdout comes from.
    hold_out = spec.eval_fraction > 0
    for src in files:
        for where, raw in read_rows(src, max_line_bytes):
            split.rows_read += 1
            try:
                shaped = shape_row(raw, spec)
                shaped, cut = fit_row(
                    shaped, max_chars, completion_only=spec.loss_on_completion_only
                )
            except ValueError as err:
                split.rows_skipped += 1
                reason = err.kind if isinstance(err, BadRow) else str(err)
                split.skip_reasons[reason] = split.skip_reasons.get(reason, 0) + 1
                if split.first_bad is None:
                    split.first_bad = f"{where}: {err}"
                continue
            if cut:
                split.rows_cut += 1
                split.first_cut = split.first_cut or where
            # The holdout side is decided by the raw row, cut or not; only its hash is kept.
            split.rows.append({HASH_KEY: _row_hash(raw), **shaped} if hold_out else shaped)
    if split.rows_skipped:
        log.warning(
            "data_rows_skipped",
            uri=uri,
            skipped=split.rows_skipped,
            read=split.rows_read,
            first=split.first_bad,
            reasons=split.skip_reasons,
        )
    if split.rows_cut:
        log.info(
            "data_rows_cut",
            uri=uri,
            cut=split.rows_cut,
            first=split.first_cut,
            max_chars=max_chars,
            reason=f"longer than data.max_length={spec.max_length} tokens could hold",
        )
    if not split.rows:
        detail = f"; first bad row: {split.first_bad}" if split.first_bad else ""
        raise DataError(f"{uri}: no usable {spec.format} rows in {split.rows_read} read{detail}")
    return split


HASH_KEY = "_hash"


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
    hashes = [r[HASH_KEY] for r in rows]
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
        "skip_reasons": dict(
            Counter(train_split.skip_reasons)
            + Counter(eval_split.skip_reasons if eval_split else {})
        ),
        "rows_cut": train_split.rows_cut + (eval_split.rows_cut if eval_split else 0),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
    }
    log.info("data_loaded", **{k: v for k, v in report.items() if k != "files"})
    strip = [{k: v for k, v in r.items() if k != HASH_KEY} for r in train_rows]
    strip_eval = [{k: v for k, v in r.items() if k != HASH_KEY} for r in eval_rows]
    return Dataset(train=strip, eval=strip_eval, fingerprint=fingerprint(files), report=report)
