"""One behaviour, two backends: a local directory and S3 over HTTP (moto's server)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import DependencyError
from service.storage import PreconditionFailed, Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(str(tmp_path / "store"))
    bucket = request.getfixturevalue("bucket")
    return open_storage(f"s3://{bucket}/prefix/")


def test_write_read_list_head_delete(storage: Storage) -> None:
    storage.write_bytes("a/one.txt", b"1")
    storage.write_bytes("a/two.txt", b"22")
    storage.write_bytes("b.txt", b"333")
    assert storage.read_bytes("a/two.txt") == b"22"
    assert [(o.key, o.size) for o in storage.list_objects("a/")] == [
        ("a/one.txt", 1),
        ("a/two.txt", 2),
    ]
    assert {o.key for o in storage.list_objects()} == {"a/one.txt", "a/two.txt", "b.txt"}
    info = storage.head("b.txt")
    assert info is not None and info.size == 3
    assert storage.head("missing") is None
    storage.delete(["a/one.txt", "b.txt"])
    assert [o.key for o in storage.list_objects()] == ["a/two.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("b.txt")


def test_conditional_writes(storage: Storage) -> None:
    tag = storage.write_bytes("ptr", b"v1", if_none_match=True)
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("ptr", b"v2", if_none_match=True)
    tag2 = storage.write_bytes("ptr", b"v2", if_match=tag)
    with pytest.raises(PreconditionFailed):
        storage.write_bytes("ptr", b"v3", if_match=tag)  # stale version
    assert storage.read_bytes("ptr") == b"v2"
    head = storage.head("ptr")
    assert head is not None and head.etag == tag2


def test_upload_download_and_child(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(3 * 2**20))
    child = storage.child("nested")
    child.upload_file(src, "x/big.bin")
    assert [o.key for o in storage.list_objects("nested/")] == ["nested/x/big.bin"]
    dst = tmp_path / "out" / "big.bin"
    child.download_file("x/big.bin", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert not list(dst.parent.glob("*.part"))


def test_missing_bucket_is_a_dependency_error(s3_server: str) -> None:
    with pytest.raises(DependencyError, match="NoSuchBucket"):
        open_storage("s3://no-such-bucket-here/").read_bytes("x")


def test_unreachable_endpoint_fails_after_retries_with_exit_69(tmp_path: Path) -> None:
    """A child process, so the retry settings and endpoint are its own."""
    code = (
        "from service.storage import open_storage\nopen_storage('s3://bucket-b/').read_bytes('k')\n"
    )
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "2",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "y",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "DependencyError" in proc.stderr
    assert "failed after 2 attempts" in proc.stderr


def test_local_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="escapes"):
        open_storage(str(tmp_path)).write_bytes("../outside", b"x")


def test_unsupported_scheme() -> None:
    with pytest.raises(ValueError, match="unsupported storage URI"):
        open_storage("gs://bucket/x")


HOLD_THE_LOCK = """
import sys, time
from pathlib import Path
from service.storage.local import LocalStorage

store = LocalStorage(Path(sys.argv[1]))

def hang(path, writer):  # inside the conditional write's check-and-set: the lock is held
    print("holding", flush=True)
    time.sleep(600)

store._atomic_write = hang
store.write_bytes("LATEST", b"old", if_none_match=True)
"""


def test_a_lock_held_by_a_killed_process_does_not_block_the_next_writer(tmp_path: Path) -> None:
    """A pod SIGKILLed mid-write (the kubelet at the grace period) must not leave the
    pointer locked for every later attempt."""
    import signal
    import threading

    root = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_LOCK, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
    store = open_storage(str(root))
    contender: list[object] = []
    waiting = threading.Thread(
        target=lambda: contender.append(store.write_bytes("LATEST", b"x", if_none_match=True)),
        daemon=True,
    )
    waiting.start()
    waiting.join(0.5)
    assert waiting.is_alive()  # still exclusive while its holder lives
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    waiting.join(5)
    assert contender and store.read_bytes("LATEST") == b"x"


def test_the_lock_is_exclusive_and_leaves_no_file_behind(tmp_path: Path) -> None:
    """Many writers race one conditional create: exactly one wins, and no lock file is left
    in the store beside its objects."""
    from concurrent.futures import ThreadPoolExecutor

    store = open_storage(str(tmp_path / "store"))

    def create(i: int) -> bool:
        try:
            store.write_bytes("run.json", str(i).encode(), if_none_match=True)
            return True
        except PreconditionFailed:
            return False

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(create, range(32))) == 1
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["run.json"]
