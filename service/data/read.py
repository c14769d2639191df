"""Data files as rows: find them (local paths, globs, S3 prefixes), read them with a bound
on every line, decode them strictly, and name the file and line of every problem.

Bytes enter here and nowhere else: a line longer than the bound is passed over without
being held whole, and one that is not UTF-8 is a row to skip (JSON lines) or an error
naming where (JSON, CSV). Rows are read in Python rather than handed straight to a
columnar reader so a bad row can be named and skipped instead of failing the job.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from service.errors import DataError
from service.storage import S3Storage, fetch_cached, split_s3_uri

SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
# The most bytes one character of row text takes in a data line: 12 for a character
# outside the Basic Multilingual Plane written as two \uXXXX escapes, as json.dumps
# writes it by default.
LINE_BYTES_PER_CHAR_BOUND = 12
# Lines up to this long are read and their rows cut, whatever max_length, so a long
# document (War and Peace is 3.2 MB) is kept; a longer line is skipped unread.
MIN_LINE_BYTES = 8 * 2**20
# Lines are read in chunks of this size, so a line over the bound is never held whole.
READ_CHUNK_BYTES = 2**20


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


def read_rows(src: SourceFile, max_line_bytes: int) -> Iterator[tuple[str, Any]]:
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
