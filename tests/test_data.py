"""Reading, checking and shaping rows, with the file and line of every problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.data import HASH_KEY, _row_hash, holdout_split, load_dataset, load_split
from service.data.read import MIN_LINE_BYTES, READ_CHUNK_BYTES, _lines
from service.data.shape import alpaca_prompt, row_chars_budget
from service.errors import DataError
from service.manifest.spec import DataSpec
from service.storage import open_storage


def spec(train: str, **kw: Any) -> DataSpec:
    return DataSpec(train=train, **kw)


def jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


ALPACA = {"instruction": "Add", "input": "1 2", "output": "3"}


def test_alpaca_becomes_prompt_and_completion(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Hi", "output": "Hello"}])
    rows = load_dataset(spec(str(f)), tmp_path).train
    assert rows[0]["prompt"].endswith("### Input:\n1 2\n\n### Response:\n")
    assert rows[0]["completion"] == "3"
    assert "### Input" not in rows[1]["prompt"]
    assert rows[1]["prompt"] == alpaca_prompt({"instruction": "Hi"})


def test_bad_rows_are_counted_and_the_first_is_named(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [ALPACA, "{broken", {"instruction": "x"}, ALPACA, [1, 2]])
    split = load_split(str(f), spec(str(f)), tmp_path)
    assert len(split.rows) == 2 and split.rows_read == 5 and split.rows_skipped == 3
    assert split.first_bad is not None and split.first_bad.startswith(f"{f} line 2: invalid JSON")


def test_no_usable_rows_is_a_data_error_naming_file_and_line(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": ""}])
    with pytest.raises(
        DataError,
        match=rf"no usable alpaca rows in 1 read; .*{f.name} line 1: "
        r"missing or empty 'output'",
    ):
        load_dataset(spec(str(f)), tmp_path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data files found"):
        load_dataset(spec(str(tmp_path / "nope.jsonl")), tmp_path)


def test_chat_rows_split_at_the_last_assistant_message(tmp_path: Path) -> None:
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    no_reply = {"messages": [{"role": "user", "content": "hi"}]}
    bad_role = {"messages": [{"role": "robot", "content": "x"}]}
    f = jsonl(tmp_path / "c.jsonl", [good, no_reply, bad_role])
    split = load_split(str(f), spec(str(f), format="chat"), tmp_path)
    assert split.rows[0]["prompt"] == good["messages"][:1]
    assert split.rows[0]["completion"] == good["messages"][1:]
    assert split.rows_skipped == 2
    full = load_split(str(f), spec(str(f), format="chat", completion_only_loss=False), tmp_path)
    assert full.rows[0]["messages"] == good["messages"]


def test_prompt_completion_and_text(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])
    assert load_dataset(spec(str(f), format="prompt_completion"), tmp_path).train == [
        {"prompt": "a", "completion": "b"}
    ]
    t = jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, {"text": 3}])
    ds = load_dataset(spec(str(t), format="text"), tmp_path)
    assert ds.train == [{"text": "hello"}] and ds.report["rows_skipped"] == 1


def test_csv_parquet_json_array_and_save_to_disk(tmp_path: Path) -> None:
    import datasets

    rows = [ALPACA, {**ALPACA, "input": "2 2", "output": "4"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "a.csv"), index=False)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("a.json", "a.csv", "a.parquet", "saved"):
        got = load_dataset(spec(str(tmp_path / name)), tmp_path / "cache").train
        assert [r["completion"] for r in got] == ["3", "4"], name


def test_glob_reads_every_match(tmp_path: Path) -> None:
    jsonl(tmp_path / "part-1.jsonl", [ALPACA])
    jsonl(tmp_path / "part-2.jsonl", [ALPACA, ALPACA])
    ds = load_dataset(spec(str(tmp_path / "part-*.jsonl")), tmp_path / "cache")
    assert len(ds.train) == 3 and len(ds.report["files"]) == 2


def hashed(i: int) -> dict[str, Any]:
    return {"i": i, HASH_KEY: _row_hash({"i": i})}


def test_holdout_does_not_drift_as_data_grows() -> None:
    rows = [hashed(i) for i in range(2000)]
    _, held_small = holdout_split(rows[:1000], 0.1)
    _, held_big = holdout_split(rows, 0.1)
    small = {r["i"] for r in held_small}
    big = {r["i"] for r in held_big}
    assert small <= big  # every row held out before is still held out
    assert 60 < len(small) < 140 and 150 < len(big) < 250


def test_tiny_data_still_gets_one_eval_row() -> None:
    train, held = holdout_split([hashed(i) for i in range(3)], 0.01)
    assert len(held) == 1 and len(train) == 2


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "a.jsonl", [ALPACA])
    first = load_dataset(spec(str(f)), tmp_path).fingerprint
    assert load_dataset(spec(str(f)), tmp_path).fingerprint == first
    jsonl(f, [ALPACA, ALPACA])
    assert load_dataset(spec(str(f)), tmp_path).fingerprint != first


def test_s3_prefix_and_glob_are_downloaded_once(bucket: str, tmp_path: Path) -> None:
    store = open_storage(f"s3://{bucket}/")
    store.write_bytes("data/a.jsonl", (json.dumps(ALPACA) + "\n").encode())
    store.write_bytes("data/b.jsonl", (json.dumps(ALPACA) + "\n").encode())
    store.write_bytes("data/notes.txt", b"ignored")
    ds = load_dataset(spec(f"s3://{bucket}/data/"), tmp_path)
    assert len(ds.train) == 2
    assert [f["uri"] for f in ds.report["files"]] == [
        f"s3://{bucket}/data/a.jsonl",
        f"s3://{bucket}/data/b.jsonl",
    ]
    assert all(f["etag"] for f in ds.report["files"])
    one = load_dataset(spec(f"s3://{bucket}/data/b*.jsonl"), tmp_path)
    assert len(one.train) == 1


# --------------------------------------------------------------------------- hostile bytes


def test_non_utf8_jsonl_lines_are_skipped_and_counted_naming_line_and_column(
    tmp_path: Path,
) -> None:
    good = json.dumps(ALPACA).encode()
    # A Latin-1 "é" (0xe9) after a UTF-8 one: the column counts characters, not bytes.
    bad = b'{"instruction": "\xc3\xa9 caf\xe9", "output": "x"}'
    worse = b'{"instruction": "\xff\xfe", "output": "x"}'
    f = tmp_path / "a.jsonl"
    f.write_bytes(b"\n".join([good, bad, good, worse]) + b"\n")
    split = load_split(str(f), spec(str(f)), tmp_path)
    assert len(split.rows) == 2 and split.rows_read == 4 and split.rows_skipped == 2
    assert split.skip_reasons == {"not valid UTF-8": 2}  # one reason, however many bytes
    assert split.first_bad == f"{f} line 2: not valid UTF-8 (byte 0xe9 at column 23)"
    report = load_dataset(spec(str(f)), tmp_path).report
    assert report["rows_skipped"] == 2 and report["skip_reasons"] == {"not valid UTF-8": 2}


def test_non_utf8_csv_is_a_data_error_naming_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_bytes(b"instruction,input,output\nAdd,1 2,3\nHi,,caf\xe9\n")
    with pytest.raises(DataError, match=rf"{f} line 3: not valid UTF-8 \(byte 0xe9 at column 8\)"):
        load_dataset(spec(str(f)), tmp_path)


def test_non_utf8_json_array_is_a_data_error_naming_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "a.json"
    before = b'  {"instruction": "Hi", "output": "caf'
    f.write_bytes(b'[\n  {"instruction": "Add", "output": "3"},\n' + before + b'\xe9"}\n]\n')
    column = len(before) + 1
    with pytest.raises(
        DataError, match=rf"{f} line 3: not valid UTF-8 \(byte 0xe9 at column {column}\)"
    ):
        load_dataset(spec(str(f)), tmp_path)


@pytest.mark.parametrize(
    ("name", "head"),
    [("a.jsonl", b""), ("a.json", b""), ("a.json", b"["), ("a.csv", b""), ("a.parquet", b"")],
)
def test_binary_garbage_is_a_data_error_not_a_crash(tmp_path: Path, name: str, head: bytes) -> None:
    import random

    f = tmp_path / name
    f.write_bytes(head + random.Random(0).randbytes(300_000))
    with pytest.raises(DataError, match=str(f)):
        load_dataset(spec(str(f)), tmp_path)


def test_unpaired_surrogate_escapes_are_skipped_before_arrow_sees_them(tmp_path: Path) -> None:
    import datasets

    chat = {
        "messages": [{"role": "user", "content": "\udc80"}, {"role": "assistant", "content": "x"}]
    }
    f = tmp_path / "a.jsonl"
    # json.dumps writes the lone surrogate as the escape \udc80, which json.loads accepts.
    jsonl(f, [ALPACA, {"instruction": "a\udc80b", "output": "x"}])
    split = load_split(str(f), spec(str(f)), tmp_path)
    assert split.skip_reasons == {"not valid Unicode: an unpaired surrogate": 1}
    assert split.first_bad is not None and "'instruction' holds \\udc80 at character 2" in (
        split.first_bad
    )
    datasets.Dataset.from_list(load_dataset(spec(str(f)), tmp_path).train)  # no UnicodeEncodeError
    c = jsonl(tmp_path / "c.jsonl", [chat, chat])
    with pytest.raises(DataError, match=r"messages\[0\] holds \\udc80"):
        load_dataset(spec(str(c), format="chat"), tmp_path)


def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path: Path) -> None:
    bom = b"\xef\xbb\xbf"
    rows = [ALPACA, {**ALPACA, "output": "4"}]
    (tmp_path / "a.jsonl").write_bytes(bom + b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    (tmp_path / "a.json").write_bytes(bom + json.dumps(rows).encode())
    (tmp_path / "a.csv").write_bytes(
        bom + b"instruction,input,output\r\nAdd,1 2,3\r\nAdd,1 2,4\r\n"
    )
    for name in ("a.jsonl", "a.json", "a.csv"):
        ds = load_dataset(spec(str(tmp_path / name)), tmp_path / "cache")
        assert [r["completion"] for r in ds.train] == ["3", "4"], name
        assert ds.report["rows_skipped"] == 0, name


def test_lines_split_as_text_files_do_and_long_ones_are_passed_over(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Against Python's own universal-newline reading, with tiny chunks, so that a CR LF
    split across chunks and a line ending just past the bound are both met."""
    import io
    import random

    import service.data.read

    rnd = random.Random(1)
    for _ in range(3000):
        data = bytes(rnd.choice(b"ab\r\n") for _ in range(rnd.randint(0, 40)))
        monkeypatch.setattr(service.data.read, "READ_CHUNK_BYTES", rnd.randint(1, 7))
        bound = rnd.randint(1, 12)
        text = io.TextIOWrapper(io.BytesIO(data), encoding="latin-1", newline="")
        want = [line.encode("latin-1") for line in text]
        want_bounded = [w if len(w.rstrip(b"\r\n")) <= bound else None for w in want]
        assert list(_lines(io.BytesIO(data), bound)) == want_bounded, (data, bound)


def test_a_20mb_line_is_skipped_unread_with_memory_bounded(tmp_path: Path) -> None:
    import tracemalloc

    huge = json.dumps({"instruction": "Repeat", "output": "x" * 20_000_000})
    f = jsonl(tmp_path / "a.jsonl", [ALPACA, huge, ALPACA])
    tracemalloc.start()
    try:
        split = load_split(str(f), spec(str(f)), tmp_path)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(split.rows) == 2 and split.rows_skipped == 1
    reason = f"line longer than {MIN_LINE_BYTES} bytes, not read"
    assert split.skip_reasons == {reason: 1}
    assert split.first_bad == f"{f} line 2: {reason}"
    # Never held whole: the reader's buffer stays within the bound and a few chunks.
    assert peak_bytes < MIN_LINE_BYTES + 4 * READ_CHUNK_BYTES < len(huge)


def test_csv_line_over_the_bound_is_a_data_error(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("instruction,input,output\nAdd,1 2,3\nHi,," + "x" * (MIN_LINE_BYTES + 1) + "\n")
    with pytest.raises(DataError, match=rf"{f} line 3: longer than {MIN_LINE_BYTES} bytes"):
        load_dataset(spec(str(f)), tmp_path)


def test_long_completion_is_cut_to_the_character_budget(tmp_path: Path) -> None:
    budget = row_chars_budget(96)
    long = {"instruction": "Repeat", "output": "y" * 1_000_000}
    f = jsonl(tmp_path / "a.jsonl", [ALPACA, long])
    ds = load_dataset(spec(str(f), max_length=96), tmp_path)
    row = ds.train[1]
    assert row["prompt"] == alpaca_prompt(long)  # the prompt is whole
    assert row["completion"] == "y" * (budget - len(row["prompt"]))
    assert ds.train[0]["completion"] == "3"
    assert ds.report["rows_cut"] == 1 and ds.report["rows_skipped"] == 0
    p = jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "y" * 1_000_000}])
    pc = load_dataset(spec(str(p), format="prompt_completion", max_length=96), tmp_path)
    assert len(pc.train[0]["completion"]) == budget - 1


def test_csv_field_longer_than_the_csv_module_allows_is_cut(tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("instruction,input,output\nAdd,1 2,3\nRepeat,," + "y" * 200_000 + "\n")
    ds = load_dataset(spec(str(f), max_length=96), tmp_path)
    assert len(ds.train) == 2 and ds.report["rows_cut"] == 1


def test_prompt_beyond_the_budget_is_skipped_unless_the_prompt_is_trained_on(
    tmp_path: Path,
) -> None:
    budget = row_chars_budget(96)
    f = jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "z" * 1_000_000, "output": "ok"}])
    split = load_split(str(f), spec(str(f), max_length=96), tmp_path)
    assert len(split.rows) == 1 and split.rows_cut == 0
    assert split.skip_reasons == {"prompt longer than data.max_length tokens could hold": 1}
    whole = load_split(str(f), spec(str(f), max_length=96, completion_only_loss=False), tmp_path)
    assert len(whole.rows) == 2 and whole.rows_cut == 1
    assert len(whole.rows[1]["prompt"]) == budget and whole.rows[1]["completion"] == ""


def test_text_and_chat_rows_are_cut_to_the_budget(tmp_path: Path) -> None:
    budget = row_chars_budget(96)
    t = jsonl(tmp_path / "t.jsonl", [{"text": "t" * 1_000_000}])
    assert load_dataset(spec(str(t), format="text", max_length=96), tmp_path).train == [
        {"text": "t" * budget}
    ]
    user = {"role": "user", "content": "hi"}
    long_reply = {"role": "assistant", "content": "a" * 1_000_000}
    c = jsonl(tmp_path / "c.jsonl", [{"messages": [user, long_reply]}])
    row = load_dataset(spec(str(c), format="chat", max_length=96), tmp_path).train[0]
    assert row == {"prompt": [user], "completion": [{**long_reply, "content": "a" * (budget - 2)}]}
    long_user = {"role": "user", "content": "u" * 1_000_000}
    m = jsonl(
        tmp_path / "m.jsonl", [{"messages": [long_user, {"role": "assistant", "content": "ok"}]}]
    )
    whole = spec(str(m), format="chat", max_length=96, completion_only_loss=False)
    ds = load_dataset(whole, tmp_path)
    assert ds.train == [{"messages": [{"role": "user", "content": "u" * budget}]}]
    assert ds.report["rows_cut"] == 1


def test_cutting_leaves_the_holdout_split_and_fingerprint_alone(tmp_path: Path) -> None:
    rows = [{"instruction": f"row {i}", "output": str(i)} for i in range(200)]
    rows += [{"instruction": f"long {i}", "output": "y" * (5000 + i)} for i in range(40)]
    f = jsonl(tmp_path / "a.jsonl", rows)
    cut = load_dataset(spec(str(f), max_length=16, eval_fraction=0.2), tmp_path)
    whole = load_dataset(spec(str(f), max_length=4096, eval_fraction=0.2), tmp_path)
    assert cut.report["rows_cut"] == 40 and whole.report["rows_cut"] == 0
    held = [r["prompt"] for r in cut.eval]
    assert held == [r["prompt"] for r in whole.eval]
    assert any("### Instruction:\nlong" in p for p in held)  # cut rows among them
    assert cut.fingerprint == whole.fingerprint
