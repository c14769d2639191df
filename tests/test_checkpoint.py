"""The commit protocol: what is resumed from, what is not, and who may write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from service.checkpoint.committer import BackgroundCommitter
from service.checkpoint.store import MANIFEST_NAME, POINTER_KEY, CheckpointStore, PointerUnreadable
from service.errors import ManifestError, Superseded
from service.storage import Storage, open_storage
from service.versions import checkpoint_versions


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
    with pytest.raises(Superseded):
        old.commit(snapshot(tmp_path, 4), 4, keep=2)
    new.commit(snapshot(tmp_path, 4), 4, keep=2)
    assert fetched_step(CheckpointStore(storage), tmp_path) == 4
    pointer, _ = new.read_pointer()
    assert pointer is not None and pointer.owner == "new-pod" and pointer.generation == 2
    # The stale writer's uncommitted files were pruned by the new owner's commit.
    assert not [o for o in storage.list_objects() if o.key.startswith("old-pod-step-00000004")]


# -- odd states after a restart ------------------------------------------------------------


def _committed_prefixes(storage: Storage) -> set[str]:
    return {o.key.split("/")[0] for o in storage.list_objects() if "-step-" in o.key}


@pytest.mark.parametrize(
    "latest",
    [
        b"{not json",
        b'{"format": 2, "generation": 3, "owner": "x", "manifest": null, "step": 0}',
        b'["a list"]',
        b'{"generation": "many", "owner": "x", "manifest": null, "step": 0}',
    ],
    ids=["garbage", "newer-format", "not-an-object", "bad-field"],
)
def test_an_unreadable_pointer_is_never_overwritten_and_nothing_is_pruned(
    storage: Storage, tmp_path: Path, latest: bytes
) -> None:
    _two_commits(storage, tmp_path)
    storage.write_bytes(POINTER_KEY, latest)
    before = _committed_prefixes(storage)
    store = CheckpointStore(storage, writer="next-pod")
    with pytest.raises(PointerUnreadable) as info:
        store.claim()
    assert "LATEST cannot be read" in str(info.value) and "move it aside" in str(info.value)
    with pytest.raises(PointerUnreadable):
        store.fetch_latest(tmp_path / "fetched")
    assert storage.read_bytes(POINTER_KEY) == latest
    assert _committed_prefixes(storage) == before == {"w-step-00000001", "w-step-00000002"}


def test_pointer_fields_from_another_version_are_tolerated(
    storage: Storage, tmp_path: Path
) -> None:
    _two_commits(storage, tmp_path)
    pointer = json.loads(storage.read_bytes(POINTER_KEY))
    assert pointer["format"] == 1
    del pointer["format"]  # as written before the field existed
    pointer["written_by"] = "a later 1.x image"  # a field this version does not know
    storage.write_bytes(POINTER_KEY, json.dumps(pointer).encode())
    assert fetched_step(CheckpointStore(storage), tmp_path) == 2
    found = CheckpointStore(storage, writer="next").claim()
    assert found is not None and found.step == 2


def test_a_missing_pointer_is_rebuilt_from_the_newest_checkpoint_that_verifies(
    storage: Storage, tmp_path: Path
) -> None:
    store = CheckpointStore(storage, writer="w")
    store.claim()
    for step in (1, 2, 3):
        store.commit(snapshot(tmp_path, step), step, keep=3)
    storage.write_bytes("w-step-00000003/adapter_model.safetensors", b"\x00")  # damaged
    storage.delete([POINTER_KEY])  # moved aside by an operator
    with capture_logs() as logs:
        new = CheckpointStore(storage, writer="next")
        found = new.claim(keep=3)
    assert found is not None and found.step == 2
    assert any(e["event"] == "checkpoint_pointer_rebuilt" for e in logs)
    assert fetched_step(new, tmp_path) == 2
    new.commit(snapshot(tmp_path, 4), 4, keep=3)
    # The rebuilt history is kept: nothing that verified was pruned by the first commit.
    assert {"w-step-00000001", "w-step-00000002", "next-step-00000004"} <= _committed_prefixes(
        storage
    )


def test_a_checkpoint_that_does_not_load_is_skipped_for_the_previous(
    storage: Storage, tmp_path: Path
) -> None:
    _two_commits(storage, tmp_path)

    def refuse_step_2(folder: Path) -> str | None:
        state = json.loads((folder / "sub" / "trainer_state.json").read_text())
        return "refused by the loader" if state["global_step"] == 2 else None

    with capture_logs() as logs:
        committed = CheckpointStore(storage).fetch_latest(tmp_path / "f", check=refuse_step_2)
    assert committed is not None and committed.step == 1
    assert any(e["event"] == "checkpoint_unloadable" for e in logs)
    assert _fallback_logged(logs)


def test_a_failed_commit_is_counted_and_never_raised(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "ckpt"))
    store = CheckpointStore(storage, writer="w")
    store.claim()
    committer = BackgroundCommitter(store, keep=2)
    seen: list[tuple[int, str]] = []
    committer.on_failure.append(lambda step, error: seen.append((step, error)))
    committer.submit(tmp_path / "no-such-snapshot", 4)
    assert committer.wait() is True  # the error is kept, not raised
    committer.submit(snapshot(tmp_path, 5), 5)
    assert committer.wait() is True
    assert [f["step"] for f in committer.failures] == [4] and seen[0][0] == 4
    assert committer.last is not None and committer.last.step == 5


def test_losing_the_run_is_raised_by_the_committer(storage: Storage, tmp_path: Path) -> None:
    old = CheckpointStore(storage, writer="old")
    old.claim()
    committer = BackgroundCommitter(old, keep=2)
    CheckpointStore(storage, writer="new").claim()
    committer.submit(snapshot(tmp_path, 3), 3)
    with pytest.raises(Superseded):
        committer.wait()
    assert committer.failures == []


def test_the_data_order_state_is_committed_with_the_manifest(
    storage: Storage, tmp_path: Path
) -> None:
    store = CheckpointStore(storage, writer="w")
    store.claim()
    state = {"micro_batch": 4, "gradient_accumulation": 2}
    store.commit(snapshot(tmp_path, 3), 3, keep=2, state=state)
    found = CheckpointStore(storage).newest_verified()
    assert found is not None and found.state == state and found.step == 3


def _resume_with_versions(
    storage: Storage, tmp_path: Path, versions: dict[str, str] | None
) -> list[dict[str, object]]:
    """Commit a checkpoint, make its manifest say another image wrote it, plan a resume."""
    from service.checkpoint.resume import Resumer
    from service.cli import EXAMPLE_MANIFEST
    from service.distributed import ranks_from_env
    from service.manifest import validate_document

    store = CheckpointStore(storage, writer="pod-a")
    store.claim()
    store.commit(snapshot(tmp_path, 10), 10, keep=2)
    key = f"pod-a-step-00000010/{MANIFEST_NAME}"
    manifest = json.loads(storage.read_bytes(key))
    assert manifest["versions"] == checkpoint_versions()
    assert set(manifest["versions"]) == {"torch", "transformers", "peft", "trl", "bitsandbytes"}
    if versions is None:
        del manifest["versions"]
    else:
        manifest["versions"].update(versions)
    storage.write_bytes(key, json.dumps(manifest).encode())
    spec = validate_document(yaml.safe_load(EXAMPLE_MANIFEST), "job.yaml").spec
    with capture_logs() as logs:
        Resumer(CheckpointStore(storage), None, spec, ranks_from_env()).plan("rows")
    return logs


def _bumped(name: str, part: int) -> str:
    """This process's version of ``name`` with its major, minor or patch number moved on."""
    numbers = checkpoint_versions()[name].split("+")[0].split(".")
    numbers[part] = str(int(numbers[part]) + 1)
    return ".".join(numbers)


def test_a_checkpoint_from_another_minor_release_is_refused_naming_the_libraries(
    storage: Storage, tmp_path: Path
) -> None:
    other = {"transformers": _bumped("transformers", 1), "trl": _bumped("trl", 0)}
    with pytest.raises(ManifestError) as info:
        _resume_with_versions(storage, tmp_path, other)
    assert info.value.exit_code == 2
    message = str(info.value)
    now = checkpoint_versions()
    assert f"transformers {other['transformers']} then, {now['transformers']} now" in message
    assert f"trl {other['trl']} then, {now['trl']} now" in message
    assert "torch" not in message.split("\n")[1]
    assert "The major.minor of torch, transformers, peft, trl must match" in message


def test_a_checkpoint_from_another_patch_release_resumes_saying_why(
    storage: Storage, tmp_path: Path
) -> None:
    other = {"torch": _bumped("torch", 2), "bitsandbytes": _bumped("bitsandbytes", 1)}
    logs = _resume_with_versions(storage, tmp_path, other)
    differ = [e for e in logs if e["event"] == "resume_versions_differ"]
    assert len(differ) == 1
    assert f"torch {other['torch']} then" in str(differ[0]["differences"])
    assert f"bitsandbytes {other['bitsandbytes']} then" in str(differ[0]["differences"])
    assert "patch releases only" in str(differ[0]["reason"])


def test_a_checkpoint_without_recorded_versions_resumes_with_a_warning(
    storage: Storage, tmp_path: Path
) -> None:
    logs = _resume_with_versions(storage, tmp_path, None)
    assert [e["event"] for e in logs if e["event"].startswith("resume_versions")] == [
        "resume_versions_unrecorded"
    ]


def test_a_failed_commit_leaves_no_staged_checkpoint_behind(tmp_path: Path) -> None:
    """The staged copy sits on the cache volume: kept after a failure, every failed commit
    of a run would add a checkpoint's size there."""
    root = tmp_path / "ckpt"
    store = CheckpointStore(open_storage(str(root)), writer="w")
    store.claim()
    committer = BackgroundCommitter(store, keep=2)
    # The checkpoint's prefix is a file: its upload fails (NotADirectoryError).
    (root / "w-step-00000004").write_text("in the way")
    staged = snapshot(tmp_path, 4)
    committer.submit(staged, 4)
    assert committer.wait() is True
    assert [f["step"] for f in committer.failures] == [4]
    assert not staged.exists()
    # Lost to another writer: nothing more to do with the copy either.
    CheckpointStore(open_storage(str(root)), writer="new").claim()
    staged = snapshot(tmp_path, 5)
    committer.submit(staged, 5)
    with pytest.raises(Superseded):
        committer.wait()
    assert not staged.exists()
