"""Training data: find the files, read rows, check them, shape them for trl.

Rows are read in Python rather than handed straight to a columnar reader so a
bad row can be named by file and line and skipped instead of failing the job;
each usable row becomes one of trl's native shapes (prompt/completion,
conversational prompt/completion, or text), and trl does the tokenizing.

Bytes enter here and nowhere else, so this is where hostile input is stopped: every
line is read with a bound on its length and decoded strictly, and a row longer than
data.max_length could use is cut (or skipped) before trl ever tokenizes it.
"""

from __future__ import annotations

import codecs
import csv
import glob
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

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

# Characters of text per token that no tokenizer averages on real text: SmolLM2's (49K
# vocabulary) averages 3.0 to 3.7 on this repository's Python, YAML, Terraform, JSON and
# README, larger vocabularies a little more, and 16 is over four times that; only
# padding-like text goes past it (lines of 64 spaces: 22). trl keeps a row's first
# max_length tokens but tokenizes all of it first, at a cost in memory that grows with
# the row (one 20 MB row took 4.5 GB), so text past max_length x this is cut before
# tokenizing. A row that beat the bound would lose text trl would have kept, and its cut
# end would fit in max_length, followed by the EOS token trl appends.
CHARS_PER_TOKEN_BOUND = 16
# The most bytes one character of row text takes in a data line: 12 for a character
# outside the Basic Multilingual Plane written as two \uXXXX escapes, as json.dumps
# writes it by default.
LINE_BYTES_PER_CHAR_BOUND = 12
# Lines up to this long are read and their rows cut, whatever max_length, so a long
# document (War and Peace is 3.2 MB) is kept; a longer line is skipped unread.
MIN_LINE_BYTES = 8 * 2**20
# Lines are read in chunks of this size, so a line over the bound is never held whole.
READ_CHUNK_BYTES = 2**20
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # escapes JSON allows that are no character


def alpaca_prompt(row: dict[str, Any]) -> str:
    if row.get("input"):
        return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])


def row_chars_budget(max_length: int) -> int:
    """The characters of text a row keeps: more could not fit in max_length tokens."""
    return max_length * CHARS_PER_TOKEN_BOUND


def line_bytes_bound(max_length: int) -> int:
    """The longest data line read: room for a row's whole character budget, escaped."""
    return max(MIN_LINE_BYTES, LINE_BYTES_PER_CHAR_BOUND * row_chars_budget(max_length))


class BadRow(ValueError):
    """A row to skip: ``kind`` is what it is counted under, the message adds the detail."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


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
    rows_cut: int = 0
    first_cut: str | None = None


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


def _read_rows(src: SourceFile, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    """Yield (location, raw row); a location names the file and line or row number.
    A row that cannot be read is yielded as the BadRow or ValueError saying why."""
    path = src.path
    if path.is_dir():
        import datasets

        for i, row in enumerate(datasets.load_from_disk(str(path))):
            yield f"{src.origin} row {i + 1}", row
        return
    kind = SUFFIXES.get(path.suffix)
    if kind == "json":
        if _first_byte(path) == b"[":
            for i, row in enumerate(_json_array(src)):
                yield f"{src.origin} item {i + 1}", row
            return
        kind = "jsonl"
    if kind == "jsonl":
        yield from _jsonl_rows(src, max_line_bytes)
    elif kind == "csv":
        yield from _csv_rows(src, max_line_bytes)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{src.origin}: not a readable Parquet file: {err}") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{src.origin} row {i + 1}", row
    else:
        raise DataError(f"{src.origin}: unsupported file type (use {', '.join(SUFFIXES)})")


def _jsonl_rows(src: SourceFile, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    with src.path.open("rb") as f:
        for lineno, line in enumerate(_lines(f, max_line_bytes), start=1):
            where = f"{src.origin} line {lineno}"
            if line is None:
                yield where, BadRow(f"line longer than {max_line_bytes} bytes, not read")
                continue
            try:
                text = _decode_line(line, first=lineno == 1)
            except BadRow as err:
                yield where, err
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as err:
                yield where, ValueError(f"invalid JSON: {err.msg}")


def _csv_rows(src: SourceFile, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
    """A bad line in a CSV file fails the file: a quoted field may span lines, so the
    rows after a line left out could not be told apart reliably."""

    def lines(f: BinaryIO) -> Iterator[str]:
        for lineno, line in enumerate(_lines(f, max_line_bytes), start=1):
            if line is None:
                raise DataError(
                    f"{src.origin} line {lineno}: longer than {max_line_bytes} bytes; a row "
                    "this long can be skipped in JSON lines, not in CSV"
                )
            try:
                yield _decode_line(line, first=lineno == 1)
            except BadRow as err:
                raise DataError(f"{src.origin} line {lineno}: {err}") from None

    # The csv module's own bound on a field (128 KiB by default) would fail long rows
    # that are only to be cut; the line bound already keeps memory in check.
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    with src.path.open("rb") as f:
        reader = csv.DictReader(lines(f))
        try:
            for row in reader:
                yield f"{src.origin} line {reader.line_num}", row
        except csv.Error as err:
            raise DataError(f"{src.origin} line {reader.line_num}: unreadable CSV: {err}") from None


def _json_array(src: SourceFile) -> list[Any]:
    """A JSON document is parsed whole, so it is decoded whole: the first bad byte fails it."""
    data = src.path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        lineno = data.count(b"\n", 0, err.start) + 1
        detail = _bad_utf8(data[line_start : err.start + 1], err.start - line_start)
        raise DataError(f"{src.origin} line {lineno}: not valid UTF-8 ({detail})") from None
    del data
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{src.origin} line {err.lineno}: invalid JSON: {err.msg}") from None
    if not isinstance(rows, list):
        raise DataError(f"{src.origin}: expected a JSON array or JSON lines")
    return rows


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace (or a byte order mark): '[' starts an array."""
    with path.open("rb") as f:
        chunk = f.read(READ_CHUNK_BYTES).removeprefix(codecs.BOM_UTF8)
        while chunk:
            if stripped := chunk.lstrip():
                return stripped[:1]
            chunk = f.read(READ_CHUNK_BYTES)
    return b""


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[bytes | None]:
    """The file's lines, split where a text file splits them (LF, CR LF or CR), read in
    chunks: a line longer than max_line_bytes is passed over without being held whole,
    and given as None."""
    buf = bytearray()
    start = 0  # where the current line begins in buf
    too_long = False  # the current line has passed the bound; its bytes are dropped
    at_eof = False
    while True:
        stop, end = _line_end(buf, start, at_eof)
        if end >= 0:
            if too_long or stop - start > max_line_bytes:
                yield None
            else:
                yield bytes(buf[start:end])
            start, too_long = end, False
            continue
        if at_eof:
            if too_long or len(buf) - start > max_line_bytes:
                yield None
            elif start < len(buf):
                yield bytes(buf[start:])
            return
        if too_long or len(buf) - start - buf.endswith(b"\r") > max_line_bytes:
            too_long = True
            cr = buf.endswith(b"\r")
            buf.clear()
            if cr:  # kept: the line may end there
                buf.append(ord("\r"))
        else:
            del buf[:start]
        start = 0
        chunk = f.read(READ_CHUNK_BYTES)
        at_eof = not chunk
        buf += chunk


def _line_end(buf: bytearray, start: int, at_eof: bool) -> tuple[int, int]:
    """Where the text of the line starting at ``start`` stops and where the line ends
    (after its LF, CR LF or CR); (-1, -1) when buf does not tell yet."""
    lf = buf.find(b"\n", start)
    cr = buf.find(b"\r", start, lf if lf >= 0 else len(buf))
    if cr >= 0 and cr + 1 == lf:
        return cr, lf + 1
    if cr >= 0 and (cr + 1 < len(buf) or at_eof):  # a CR last in buf may be half a CR LF
        return cr, cr + 1
    if cr < 0 and lf >= 0:
        return lf, lf + 1
    return -1, -1


def _decode_line(line: bytes, *, first: bool) -> str:
    if first:
        line = line.removeprefix(codecs.BOM_UTF8)
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRow("not valid UTF-8", _bad_utf8(line, err.start)) from None


def _bad_utf8(line: bytes, start: int) -> str:
    """Name the first undecodable byte of a line and its column, counted in characters
    (the bytes before it decode, or the decoder would have stopped there)."""
    column = len(line[:start].decode("utf-8")) + 1
    return f"byte 0x{line[start]:02x} at column {column}"


# --------------------------------------------------------------------------- shaping


def _text(row: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise ValueError(f"missing or empty {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {type(value).__name__}")
    return _unicode(value, repr(key))


def _unicode(value: str, what: str) -> str:
    """Refuse text no tokenizer or Arrow column takes: a JSON line may escape half of a
    surrogate pair (\\udc80), which decodes to no character and cannot be encoded."""
    if not value.isascii() and (bad := _SURROGATE.search(value)):
        detail = f"{what} holds \\u{ord(bad.group()):04x} at character {bad.start() + 1}"
        raise BadRow("not valid Unicode: an unpaired surrogate", detail)
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
        clean.append({"role": m["role"], "content": _unicode(m["content"], f"messages[{i}]")})
    if clean[-1]["role"] != "assistant" or len(clean) < 2:
        raise ValueError("a chat row must end with an assistant message after a prompt")
    if spec.loss_on_completion_only:
        return {"prompt": clean[:-1], "completion": clean[-1:]}
    return {"messages": clean}


def fit_row(
    row: dict[str, Any], max_chars: int, *, completion_only: bool
) -> tuple[dict[str, Any], bool]:
    """Cut a shaped row's text to max_chars characters, keeping its start as trl's
    truncation would; says whether it cut. A prompt that alone fills the budget leaves no
    response token to train on (trl would drop the row), so such a row is skipped."""
    if "text" in row:
        text = row["text"]
        return ({"text": text[:max_chars]}, True) if len(text) > max_chars else (row, False)
    if "messages" in row:
        if _chars(row["messages"]) <= max_chars:
            return row, False
        return {"messages": _cut_messages(row["messages"], max_chars)}, True
    prompt, completion = row["prompt"], row["completion"]
    prompt_chars = _chars(prompt)
    if prompt_chars + _chars(completion) <= max_chars:
        return row, False
    if completion_only and prompt_chars >= max_chars:
        raise BadRow("prompt longer than data.max_length tokens could hold")
    if isinstance(prompt, str):
        prompt = prompt[:max_chars]
        completion = completion[: max_chars - len(prompt)]
    else:
        prompt = _cut_messages(prompt, max_chars)
        completion = _cut_messages(completion, max_chars - _chars(prompt))
    return {"prompt": prompt, "completion": completion}, True


def _chars(part: str | list[dict[str, str]]) -> int:
    return len(part) if isinstance(part, str) else sum(len(m["content"]) for m in part)


def _cut_messages(messages: list[dict[str, str]], max_chars: int) -> list[dict[str, str]]:
    """The conversation's first max_chars characters of content: the message that
    crosses the budget is cut, those after it dropped."""
    kept: list[dict[str, str]] = []
    left = max_chars
    for m in messages:
        if len(m["content"]) >= left:
            if left:
                kept.append({**m, "content": m["content"][:left]})
            return kept
        kept.append(m)
        left -= len(m["content"])
    return kept


def load_split(uri: str, spec: DataSpec, cache_dir: Path) -> LoadedSplit:
    files = resolve_files(uri, cache_dir)
    split = LoadedSplit(rows=[], files=files)
    max_chars = row_chars_budget(spec.max_length)
    max_line_bytes = line_bytes_bound(spec.max_length)
    # data.eval and data.eval_fraction are exclusive: a fraction means this is the split
    # the holdout comes from.
    hold_out = spec.eval_fraction > 0
    for src in files:
        for where, raw in _read_rows(src, max_line_bytes):
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
    strip = [{k: v for k, v in r.items() if k != HASH_KEY} for r in train_rows]
    strip_eval = [{k: v for k, v in r.items() if k != HASH_KEY} for r in eval_rows]
    return Dataset(train=strip, eval=strip_eval, fingerprint=fingerprint(files), report=report)
