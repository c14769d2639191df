"""Reading, checking and shaping rows, with the file and line of every problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.data import alpaca_prompt, holdout_split, load_dataset, load_split
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


def test_holdout_does_not_drift_as_data_grows() -> None:
    rows = [{"_raw": {"i": i}} for i in range(2000)]
    _, held_small = holdout_split(rows[:1000], 0.1)
    _, held_big = holdout_split(rows, 0.1)
    small = {r["_raw"]["i"] for r in held_small}
    big = {r["_raw"]["i"] for r in held_big}
    assert small <= big  # every row held out before is still held out
    assert 60 < len(small) < 140 and 150 < len(big) < 250


def test_tiny_data_still_gets_one_eval_row() -> None:
    train, held = holdout_split([{"_raw": {"i": i}} for i in range(3)], 0.01)
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
