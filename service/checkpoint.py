"""Preemption-safe checkpoints: atomic commit to storage, verified resume, retention.

Layout under the run's checkpoint prefix::

    <writer>-step-00000120/...files...        the checkpoint's files (Trainer's format)
    <writer>-step-00000120/MANIFEST.json      size + sha256 of every file: written after them
    LATEST                                    pointer to the newest committed manifest: last

A checkpoint exists only once LATEST (or an older manifest that LATEST's history
names) points at it; files without a manifest, and manifests whose files do not
match, are never resumed from. Every writer (one process of one pod) uses its own
directory names, and LATEST is only ever moved with a conditional write against the
version this writer last saw, so a stale pod that outlived its replacement cannot
move the pointer back (fencing): its write fails with 412 and it stops.
"""

from __future__ import annotations

import contextvars
import json
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from service.errors import SpotloraError
from service.storage import PreconditionFailed, Storage, sha256_file

log = structlog.get_logger(__name__)

POINTER_KEY = "LATEST"
MANIFEST_NAME = "MANIFEST.json"
FORMAT_VERSION = 1


class Fenced(SpotloraError):
    """Another process took over this run; this one must stop writing."""


@dataclass(frozen=True)
class Pointer:
    generation: int  # bumped by every writer that claims the run
    owner: str
    manifest: str | None  # key of the newest committed manifest, None before the first
    step: int
    history: list[str] = field(default_factory=list)  # older committed manifests, newest first


@dataclass(frozen=True)
class Committed:
    step: int
    manifest_key: str
    files: dict[str, dict[str, Any]]

    @property
    def prefix(self) -> str:
        return self.manifest_key.rsplit("/", 1)[0]


class CheckpointStore:
    """The commit protocol over any Storage. One instance per writer process."""

    def __init__(self, storage: Storage, writer: str | None = None) -> None:
        self.storage = storage
        self.writer = writer or uuid.uuid4().hex[:12]
        self._pointer_tag: str | None = None
        self._pointer: Pointer | None = None

    # -- reading ---------------------------------------------------------------

    def read_pointer(self) -> tuple[Pointer | None, str | None]:
        info = self.storage.head(POINTER_KEY)
        if info is None:
            return None, None
        raw = self.storage.read_bytes(POINTER_KEY)
        try:
            data = json.loads(raw)
            pointer = Pointer(**data)
        except (ValueError, TypeError) as err:
            log.warning("checkpoint_pointer_unreadable", error=str(err))
            return None, info.etag
        return pointer, info.etag

    def verify(self, manifest_key: str) -> Committed | None:
        """Load a manifest and check every file's size and checksum against storage."""
        try:
            manifest = json.loads(self.storage.read_bytes(manifest_key))
        except FileNotFoundError:
            log.warning("checkpoint_manifest_missing", manifest=manifest_key)
            return None
        except ValueError:
            log.warning("checkpoint_manifest_corrupt", manifest=manifest_key)
            return None
        prefix = manifest_key.rsplit("/", 1)[0]
        listed = {o.key: o.size for o in self.storage.list_objects(prefix + "/")}
        for name, meta in manifest["files"].items():
            size = listed.get(f"{prefix}/{name}")
            if size != meta["size"]:
                log.warning(
                    "checkpoint_incomplete",
                    manifest=manifest_key,
                    file=name,
                    expected_bytes=meta["size"],
                    found_bytes=size,
                )
                return None
        return Committed(manifest["step"], manifest_key, manifest["files"])

    def download(self, committed: Committed, local_dir: Path) -> bool:
        """Fetch and checksum every file; False (and nothing left behind) on a mismatch."""
        if local_dir.exists():
            shutil.rmtree(local_dir)
        local_dir.mkdir(parents=True)
        for name, meta in committed.files.items():
            target = local_dir / name
            self.storage.download_file(f"{committed.prefix}/{name}", target)
            if sha256_file(target) != meta["sha256"]:
                log.warning(
                    "checkpoint_checksum_mismatch", manifest=committed.manifest_key, file=name
                )
                shutil.rmtree(local_dir)
                return False
        return True

    def fetch_latest(self, local_dir: Path) -> Committed | None:
        """Download the newest checkpoint that verifies, falling back to older ones."""
        pointer, _ = self.read_pointer()
        if pointer is None or pointer.manifest is None:
            return None
        for key in [pointer.manifest, *pointer.history]:
            committed = self.verify(key)
            if committed is not None and self.download(committed, local_dir):
                if key != pointer.manifest:
                    log.warning("checkpoint_fallback", newest=pointer.manifest, using=key)
                return committed
        log.warning("checkpoint_none_usable", tried=[pointer.manifest, *pointer.history])
        return None

    # -- writing ---------------------------------------------------------------

    def claim(self) -> Pointer | None:
        """Take over the run: bump the pointer's generation so that any earlier writer's
        next commit fails its precondition. Returns the pointer as found."""
        found, tag = self.read_pointer()
        claimed = Pointer(
            generation=(found.generation + 1) if found else 1,
            owner=self.writer,
            manifest=found.manifest if found else None,
            step=found.step if found else 0,
            history=found.history if found else [],
        )
        self._write_pointer(claimed, tag, fresh=found is None and tag is None)
        return found

    def _write_pointer(self, pointer: Pointer, expected_tag: str | None, *, fresh: bool) -> None:
        data = json.dumps(asdict(pointer), indent=1).encode()
        try:
            if fresh:
                tag = self.storage.write_bytes(POINTER_KEY, data, if_none_match=True)
            else:
                tag = self.storage.write_bytes(POINTER_KEY, data, if_match=expected_tag)
        except PreconditionFailed:
            raise Fenced(
                "another process has taken over this run (its checkpoint pointer moved); "
                "this one stops without writing"
            ) from None
        self._pointer, self._pointer_tag = pointer, tag

    def commit(self, local_dir: Path, step: int, keep: int) -> Committed:
        """Upload, then write the manifest, then move the pointer; then prune."""
        if self._pointer is None:
            raise RuntimeError("claim() the run before committing")
        prefix = f"{self.writer}-step-{step:08d}"
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            name = path.relative_to(local_dir).as_posix()
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            self.storage.upload_file(path, f"{prefix}/{name}")
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "writer": self.writer,
            "created_unix": time.time(),
            "files": files,
        }
        manifest_key = f"{prefix}/{MANIFEST_NAME}"
        self.storage.write_bytes(
            manifest_key, json.dumps(manifest, indent=1).encode(), if_none_match=True
        )
        old = self._pointer
        history = [k for k in [old.manifest, *old.history] if k][: max(keep - 1, 0)]
        self._write_pointer(
            Pointer(old.generation, self.writer, manifest_key, step, history),
            self._pointer_tag,
            fresh=False,
        )
        self._prune(keep=[manifest_key, *history])
        return Committed(step, manifest_key, files)

    def _prune(self, keep: list[str]) -> None:
        """Delete everything the pointer no longer names. Safe only here, right after our
        own commit: our claim fenced every earlier writer, so their uncommitted files can
        never be committed, and we have no other upload in flight."""
        keep_prefixes = {k.rsplit("/", 1)[0] for k in keep}
        doomed = [
            o.key
            for o in self.storage.list_objects()
            if o.key != POINTER_KEY and o.key.split("/", 1)[0] not in keep_prefixes
        ]
        if doomed:
            self.storage.delete(doomed)


class BackgroundCommitter:
    """Commit checkpoints in a thread while training goes on. At most one upload is in
    flight; a new one first waits for the previous, so the order of commits is the order
    of steps. Errors are kept and re-raised by wait()."""

    def __init__(self, store: CheckpointStore, keep: int) -> None:
        self.store = store
        self.keep = keep
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last: Committed | None = None
        self.last_upload_seconds = 0.0
        self.last_upload_bytes = 0
        self.on_commit: list[Any] = []

    def submit(self, local_dir: Path, step: int, *, remove_after: bool = True) -> None:
        self.wait(raise_errors=False)
        # The upload logs with the run's bound identity (job, run id, rank).
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run,
            args=(self._run, local_dir, step, remove_after),
            name="checkpoint-commit",
            daemon=True,
        )
        self._thread.start()

    def _run(self, local_dir: Path, step: int, remove_after: bool) -> None:
        start = time.monotonic()
        try:
            size = sum(p.stat().st_size for p in local_dir.rglob("*") if p.is_file())
            committed = self.store.commit(local_dir, step, self.keep)
            self.last = committed
            self.last_upload_seconds = time.monotonic() - start
            self.last_upload_bytes = size
            log.info(
                "checkpoint_committed",
                step=step,
                manifest=committed.manifest_key,
                upload_seconds=round(self.last_upload_seconds, 3),
                upload_bytes=size,
            )
            for callback in self.on_commit:
                callback(committed, self.last_upload_seconds, size)
            if remove_after:
                shutil.rmtree(local_dir, ignore_errors=True)
        except BaseException as err:  # kept for the training thread to see
            self._error = err
            log.error("checkpoint_commit_failed", step=step, error=str(err))

    def wait(self, timeout_seconds: float | None = None, *, raise_errors: bool = True) -> bool:
        """Wait for the upload in flight; True when none is left running."""
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            if self._thread.is_alive():
                return False
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if raise_errors or isinstance(err, Fenced):
                raise err
        return True
