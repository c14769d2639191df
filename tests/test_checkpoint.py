"""The commit protocol: what is resumed from, what is not, and who may write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from service.checkpoint import MANIFEST_NAME, POINTER_KEY, CheckpointStore, Fenced
from service.storage import Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "ckpt"))
    return open_storage(f"s3://{request.getfixturevalue('bucket')}/run-1/")


def snapshot(tmp_path: Path, step: int) -> Path:
    d = tmp_path / f"snap-{step}"
    (d / "sub").mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(bytes([step % 256]) * 1000)
    (d / "sub" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def fetched_step(store: CheckpointStore, tmp_path: Path) -> int | None:
    out = tmp_path / "fetched"
    committed = store.fetch_latest(out)
    if committed is None:
        return None
    assert json.loads((out / "sub" / "trainer_state.json").read_text())["global_step"] == (
        committed.step
    )
    return committed.step


def test_commit_then_resume_roundtrip(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage, writer="pod-a")
    assert store.claim() is None
    assert fetched_step(store, tmp_path) is None
    store.commit(snapshot(tmp_path, 10), 10, keep=2)
    assert fetched_step(CheckpointStore(storage), tmp_path) == 10
    manifest = json.loads(storage.read_bytes(f"pod-a-step-00000010/{MANIFEST_NAME}"))
    assert set(manifest["files"]) == {"adapter_model.safetensors", "sub/trainer_state.json"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())


def test_retention_keeps_the_newest_and_deletes_only_after_commit(
    storage: Storage, tmp_path: Path
) -> None:
    store = CheckpointStore(storage, writer="w")
    store.claim()
    for step in (1, 2, 3, 4):
        store.commit(snapshot(tmp_path, step), step, keep=2)
    dirs = {o.key.split("/")[0] for o in storage.list_objects() if o.key != POINTER_KEY}
    assert dirs == {"w-step-00000003", "w-step-00000004"}


def test_uncommitted_files_are_never_resumed(storage: Storage, tmp_path: Path) -> None:
    store = CheckpointStore(storage, writer="w")
    store.claim()
    store.commit(snapshot(tmp_path, 5), 5, keep=3)
    # A pod killed mid-upload: files of step 6 but no manifest and no pointer move.
    storage.upload_file(
        snapshot(tmp_path, 6) / "adapter_model.safetensors",
        "w2-step-00000006/adapter_model.safetensors",
    )
    assert fetched_step(CheckpointStore(storage), tmp_path) == 5


def _two_commits(storage: Storage, tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(storage, writer="w")
    store.claim()
    store.commit(snapshot(tmp_path, 1), 1, keep=3)
    store.commit(snapshot(tmp_path, 2), 2, keep=3)
    return store


def _fallback_logged(logs: list[dict[str, object]]) -> bool:
    return any(e["event"] == "checkpoint_fallback" for e in logs)


def test_truncated_file_falls_back(storage: Storage, tmp_path: Path) -> None:
    _two_commits(storage, tmp_path)
    storage.write_bytes("w-step-00000002/adapter_model.safetensors", b"\x02" * 10)
    with capture_logs() as logs:
        assert fetched_step(CheckpointStore(storage), tmp_path) == 1
    assert any(e["event"] == "checkpoint_incomplete" for e in logs)
    assert _fallback_logged(logs)


def test_checksum_mismatch_falls_back(storage: Storage, tmp_path: Path) -> None:
    _two_commits(storage, tmp_path)
    storage.write_bytes("w-step-00000002/adapter_model.safetensors", b"\x09" * 1000)  # same size
    with capture_logs() as logs:
        assert fetched_step(CheckpointStore(storage), tmp_path) == 1
    assert any(e["event"] == "checkpoint_checksum_mismatch" for e in logs)
    assert _fallback_logged(logs)


def test_missing_manifest_falls_back(storage: Storage, tmp_path: Path) -> None:
    _two_commits(storage, tmp_path)
    storage.delete([f"w-step-00000002/{MANIFEST_NAME}"])
    with capture_logs() as logs:
        assert fetched_step(CheckpointStore(storage), tmp_path) == 1
    assert any(e["event"] == "checkpoint_manifest_missing" for e in logs)


def test_pointer_to_a_missing_step_falls_back(storage: Storage, tmp_path: Path) -> None:
    _two_commits(storage, tmp_path)
    storage.delete([o.key for o in storage.list_objects("w-step-00000002/")])
    with capture_logs() as logs:
        assert fetched_step(CheckpointStore(storage), tmp_path) == 1
    assert _fallback_logged(logs)


def test_nothing_usable_means_a_fresh_start(storage: Storage, tmp_path: Path) -> None:
    _two_commits(storage, tmp_path)
    storage.delete([o.key for o in storage.list_objects() if o.key != POINTER_KEY])
    with capture_logs() as logs:
        assert fetched_step(CheckpointStore(storage), tmp_path) is None
    assert any(e["event"] == "checkpoint_none_usable" for e in logs)


def test_a_stale_writer_is_fenced_off(storage: Storage, tmp_path: Path) -> None:
    old = CheckpointStore(storage, writer="old-pod")
    old.claim()
    old.commit(snapshot(tmp_path, 3), 3, keep=2)
    new = CheckpointStore(storage, writer="new-pod")
    new.claim()  # the replacement pod takes over the run
    with pytest.raises(Fenced):
        old.commit(snapshot(tmp_path, 4), 4, keep=2)
    new.commit(snapshot(tmp_path, 4), 4, keep=2)
    assert fetched_step(CheckpointStore(storage), tmp_path) == 4
    pointer, _ = new.read_pointer()
    assert pointer is not None and pointer.owner == "new-pod" and pointer.generation == 2
    # The stale writer's uncommitted files were pruned by the new owner's commit.
    assert not [o for o in storage.list_objects() if o.key.startswith("old-pod-step-00000004")]
