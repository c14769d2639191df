"""A finished run's outputs: what a publication replaces, and where every crash restarts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from service.export import EXPORT_RECORD
from service.history import RunHistory
from service.publication import PENDING_RECORD, Publisher
from service.retraining import Decision
from service.storage import Storage, open_storage


def publisher(out: Path, tmp_path: Path) -> Publisher:
    storage = open_storage(str(out))
    return Publisher(
        storage, None, "run-1", keep_runs=None, checkpoint_root=storage, work_dir=tmp_path / "w"
    )


def adapter(tmp_path: Path, content: bytes = b"new weights") -> Path:
    folder = tmp_path / "staged-adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(content)
    (folder / "adapter_config.json").write_text("{}")
    return folder


def test_a_new_adapter_takes_down_the_merged_model_of_the_old_one(tmp_path: Path) -> None:
    """With export.merged off, nothing else would replace merged/: its EXPORT.json would go
    on vouching for a model merged from the adapter this one replaces."""
    out = tmp_path / "out"
    (out / "merged").mkdir(parents=True)
    (out / EXPORT_RECORD).write_text('{"adapter_sha256": "the old adapter"}')
    (out / "merged" / "model.safetensors").write_bytes(b"merged from the old adapter")
    (out / "run.json").write_text('{"status": "succeeded"}')
    publisher(out, tmp_path).upload_adapter(adapter(tmp_path))
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert on_disk == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors"]


class Killed(BaseException):
    """The process dies here: nothing after it runs, not even an ``except Exception``."""


class DiesAtWrite:
    """A store (and its children) that dies at its ``n``-th write or delete, before it."""

    def __init__(self, inner: Storage, n: int, count: list[int] | None = None) -> None:
        self.inner, self.n, self.count = inner, n, count if count is not None else [0]
        self.uri = inner.uri

    def _write(self) -> None:
        self.count[0] += 1
        if self.count[0] == self.n:
            raise Killed(f"killed at write {self.n}")

    def write_bytes(self, key: str, data: bytes, **kwargs: Any) -> str:
        self._write()
        return self.inner.write_bytes(key, data, **kwargs)

    def upload_file(self, local: Path, key: str) -> None:
        self._write()
        self.inner.upload_file(local, key)

    def delete(self, keys: list[str]) -> None:
        self._write()
        self.inner.delete(keys)

    def child(self, prefix: str) -> DiesAtWrite:
        return DiesAtWrite(self.inner.child(prefix), self.n, self.count)

    def __getattr__(self, name: str) -> Any:  # reads pass through
        return getattr(self.inner, name)


def nightly(storage: Any, tmp_path: Path) -> Publisher:
    history = RunHistory(storage)
    return Publisher(
        history.run_storage("night-1"),
        history,
        "night-1",
        keep_runs=None,
        checkpoint_root=storage.child("checkpoints"),
        work_dir=tmp_path / "w",
    )


def night_record(decision: Decision | None) -> dict[str, Any]:
    return {
        "run_id": "night-1",
        "status": "succeeded",
        "timings": {"started_unix": 1000.0},
        "data": {"fingerprint": "f"},
        "steps": 6,
        "losses": {"final_train": 1.0, "final_eval": 0.5},
        "promotion": vars(decision) if decision else None,
    }


def publish_night(publisher: Publisher, adapter_dir: Path, compared_tag: str | None) -> None:
    publisher.upload_adapter(adapter_dir)
    publisher.publish(
        decision=Decision(True, "eval loss better"),
        compared_tag=compared_tag,
        eval_loss=0.5,
        record=night_record,
    )


def test_a_crash_at_any_write_of_a_promotion_restarts_to_the_same_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The promoted run dies at each of its publication's writes in turn. The restart either
    finds the run decided (and completes it: PUBLISHED names it, run.json says promoted), or
    finds nothing published, so that its gate compares against the adapter this attempt
    compared against, never its own (which it would then overwrite in place)."""
    monkeypatch.setattr("service.publication.Publisher._report", lambda self, record: None)
    restarts: list[str] = []
    for n in itertools.count(1):
        root = tmp_path / f"crash-{n}"
        storage = open_storage(str(root / "out"))
        earlier = {"run_id": "night-0", "adapter": "runs/night-0/adapter"}
        RunHistory(storage).publish(earlier, None)
        before = RunHistory(storage).published()
        staged = adapter(root)
        try:
            publish_night(nightly(DiesAtWrite(storage, n), root), staged, before[1])
        except Killed:
            pass
        else:
            break  # no write left to die at
        restart = nightly(storage, root)
        found = restart.finished(repair=True)
        if found is None:  # trains (resumes) and gates again: against the same PUBLISHED
            restarts.append("gated again")
            assert RunHistory(storage).published() == before, f"killed at write {n}"
            publish_night(restart, staged, before[1])
        else:
            restarts.append("decided")
        published, _ = RunHistory(storage).published()
        assert published is not None and published["run_id"] == "night-1", n
        record = json.loads(storage.read_bytes("runs/night-1/run.json"))
        assert record["promotion"] == {"promoted": True, "reason": "eval loss better"}, n
        assert storage.head(f"runs/night-1/{PENDING_RECORD}") is None, n
        assert [e["run_id"] for e in RunHistory(storage).entries()] == ["night-1"], n
    # Every kind of crash point was met: before the decision, after it, after run.json.
    assert "gated again" in restarts and "decided" in restarts, restarts
    assert n > 6, n
