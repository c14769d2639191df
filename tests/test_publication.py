"""A finished run's outputs: what a publication replaces, and where every crash restarts."""

from __future__ import annotations

from pathlib import Path

from service.export import EXPORT_RECORD
from service.publication import Publisher
from service.storage import open_storage


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
