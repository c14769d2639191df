"""Preemption-safe checkpoints: atomic commit to storage, verified resume, retention.

Layout under the run's checkpoint prefix::

    <writer>-step-00000120/...files...        the checkpoint's files (Trainer's format)
    <writer>-step-00000120/MANIFEST.json      size + sha256 of every file, the run's
                                              data-order state and the library versions:
                                              written after the files
    LATEST                                    pointer to the newest committed manifest: last
    attempts/...                              one record per attempt (service.attempts)

A checkpoint exists only once LATEST (or an older manifest that LATEST's history
names) points at it; files without a manifest, and manifests whose files do not
match, are never resumed from. Every writer (one process of one pod) uses its own
directory names, and LATEST is only ever moved with a conditional write against the
version this writer last saw, so a stale pod that outlived its replacement cannot
move the pointer back (fencing): its write fails with 412 and it stops.

LATEST is never overwritten unless it was read: one that cannot be read (damaged, or
written by a newer format) stops the run before anything is claimed or pruned. One that
is missing while checkpoints are there (moved aside by an operator) is rebuilt from the
newest checkpoints whose MANIFEST verifies.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from service.errors import DependencyError, Superseded
from service.storage import PreconditionFailed, Storage, sha256_file
from service.versions import checkpoint_versions

log = structlog.get_logger(__name__)

POINTER_KEY = "LATEST"
MANIFEST_NAME = "MANIFEST.json"
ATTEMPTS_PREFIX = "attempts/"
FORMAT_VERSION = 1  # of MANIFEST.json
# LATEST's format. Fields may be added within a format (readers ignore the ones they do not
# know); a change that older readers would misread takes a new number, which they refuse.
POINTER_FORMAT = 1
_STEP_DIR = re.compile(r"^(?P<writer>.+)-step-(?P<step>\d{8})$")

# Checks a downloaded checkpoint can be loaded; returns why not, or None.
LoadCheck = Callable[[Path], "str | None"]


class PointerUnreadable(DependencyError):
    """LATEST is there but cannot be read. Retryable: a newer image, or an operator who
    moves the damaged pointer aside, resolves it; this image must not overwrite it."""


@dataclass(frozen=True)
class Pointer:
    generation: int  # bumped by every writer that claims the run
    owner: str
    manifest: str | None  # key of the newest committed manifest, None before the first
    step: int
    history: list[str] = field(default_factory=list)  # older committed manifests, newest first
    format: int = POINTER_FORMAT

    @classmethod
    def parse(cls, raw: bytes) -> Pointer:
        """Raise ValueError saying why it cannot be read."""
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"not JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        version = data.get("format", 1)  # pointers before the field was added are format 1
        if version != POINTER_FORMAT:
            raise ValueError(
                f"pointer format {version!r}, this spotlora reads format {POINTER_FORMAT} "
                "(written by another version?)"
            )
        try:
            pointer = cls(
                generation=int(data["generation"]),
                owner=str(data["owner"]),
                manifest=data["manifest"],
                step=int(data["step"]),
                history=list(data.get("history") or []),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"missing or malformed field {err}") from None
        if pointer.manifest is not None and not isinstance(pointer.manifest, str):
            raise ValueError("field 'manifest' is not a key")
        if not all(isinstance(k, str) for k in pointer.history):
            raise ValueError("field 'history' is not a list of keys")
        return pointer

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


@dataclass(frozen=True)
class Committed:
    step: int
    manifest_key: str
    files: dict[str, dict[str, Any]]
    state: dict[str, Any] | None = None  # the run's data-order state (service.resume)
    versions: dict[str, str] | None = None  # the libraries that wrote it; None before recorded

    @property
    def prefix(self) -> str:
        return self.manifest_key.rsplit("/", 1)[0]


class PointerFile:
    """LATEST: read strictly, written only against the version last read (compare-and-set).
    Losing a write to another writer is Superseded: this process no longer owns the run."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.current: Pointer | None = None  # as this process last wrote it
        self.tag: str | None = None

    def read(self) -> tuple[Pointer | None, str | None]:
        info = self.storage.head(POINTER_KEY)
        if info is None:
            return None, None
        try:
            return Pointer.parse(self.storage.read_bytes(POINTER_KEY)), info.etag
        except FileNotFoundError:
            return None, None
        except ValueError as err:
            raise PointerUnreadable(
                f"{self.storage.uri.rstrip('/')}/{POINTER_KEY} cannot be read: {err}. It is left "
                "as it is and nothing is pruned. If another spotlora version wrote it, run that "
                f"version; if it is damaged, move it aside (e.g. to {POINTER_KEY}.damaged) and "
                "the next attempt rebuilds it from the newest checkpoint that verifies"
            ) from None

    def write(self, pointer: Pointer, expected_tag: str | None) -> None:
        """Create it (``expected_tag`` None) or replace the version ``expected_tag``."""
        try:
            if expected_tag is None:
                tag = self.storage.write_bytes(POINTER_KEY, pointer.to_json(), if_none_match=True)
            else:
                tag = self.storage.write_bytes(
                    POINTER_KEY, pointer.to_json(), if_match=expected_tag
                )
        except PreconditionFailed:
            raise Superseded(
                "another process has taken over this run (its checkpoint pointer moved); "
                "this one stops without writing"
            ) from None
        self.current, self.tag = pointer, tag


class CheckpointStore:
    """The commit protocol over any Storage. One instance per writer process."""

    def __init__(self, storage: Storage, writer: str | None = None) -> None:
        self.storage = storage
        self.writer = writer or uuid.uuid4().hex[:12]
        self.pointer = PointerFile(storage)

    # -- reading ---------------------------------------------------------------

    def read_pointer(self) -> tuple[Pointer | None, str | None]:
        """The pointer and its version tag; (None, None) when there is none."""
        return self.pointer.read()

    def _listed_manifests(self) -> list[str]:
        """Every manifest in storage, newest step first: for rebuilding a missing pointer."""
        found = []
        for obj in self.storage.list_objects():
            prefix, _, name = obj.key.partition("/")
            match = _STEP_DIR.match(prefix)
            if name == MANIFEST_NAME and match:
                found.append((int(match["step"]), obj.key))
        return [key for _, key in sorted(found, reverse=True)]

    def committed_keys(self) -> list[str]:
        """Manifests to try, newest first: those the pointer names, or, with no pointer,
        those found by listing."""
        pointer, _ = self.read_pointer()
        if pointer is None:
            return self._listed_manifests()
        return [k for k in [pointer.manifest, *pointer.history] if k]

    def verify(self, manifest_key: str) -> Committed | None:
        """Load a manifest and check every file's size against storage."""
        try:
            manifest = json.loads(self.storage.read_bytes(manifest_key))
            files = manifest["files"]
            step = int(manifest["step"])
        except FileNotFoundError:
            log.warning("checkpoint_manifest_missing", manifest=manifest_key)
            return None
        except (ValueError, KeyError, TypeError):
            log.warning("checkpoint_manifest_corrupt", manifest=manifest_key)
            return None
        prefix = manifest_key.rsplit("/", 1)[0]
        listed = {o.key: o.size for o in self.storage.list_objects(prefix + "/")}
        for name, meta in files.items():
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
        versions = manifest.get("versions")
        versions = versions if isinstance(versions, dict) else None
        return Committed(step, manifest_key, files, manifest.get("state"), versions)

    def newest_verified(self) -> Committed | None:
        """The newest committed checkpoint whose files are all there, without fetching them:
        what the run would resume from, for checks made before anything is loaded."""
        for key in self.committed_keys():
            committed = self.verify(key)
            if committed is not None:
                return committed
        return None

    def download(
        self, committed: Committed, local_dir: Path, check: LoadCheck | None = None
    ) -> bool:
        """Fetch, checksum and (with ``check``) test-load every file; False, with nothing
        left behind, when any of that fails."""
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
        problem = check(local_dir) if check is not None else None
        if problem is not None:
            log.warning("checkpoint_unloadable", manifest=committed.manifest_key, problem=problem)
            shutil.rmtree(local_dir)
            return False
        return True

    def fetch_latest(self, local_dir: Path, check: LoadCheck | None = None) -> Committed | None:
        """Download the newest checkpoint that verifies and loads, falling back to older ones."""
        keys = self.committed_keys()
        if not keys:
            return None
        for key in keys:
            committed = self.verify(key)
            if committed is not None and self.download(committed, local_dir, check):
                if key != keys[0]:
                    log.warning("checkpoint_fallback", newest=keys[0], using=key)
                return committed
        log.warning("checkpoint_none_usable", tried=keys)
        return None

    # -- writing ---------------------------------------------------------------

    def claim(self, keep: int = 2) -> Pointer | None:
        """Take over the run: bump the pointer's generation so that any earlier writer's
        next commit fails its precondition. Returns the pointer as found (rebuilt from the
        checkpoints in storage when it was missing). An unreadable pointer raises
        PointerUnreadable before anything is written."""
        found, tag = self.read_pointer()
        if found is None:
            found = self._rebuilt_pointer(keep)
        claimed = Pointer(
            generation=(found.generation + 1) if found else 1,
            owner=self.writer,
            manifest=found.manifest if found else None,
            step=found.step if found else 0,
            history=found.history if found else [],
        )
        self.pointer.write(claimed, tag)
        return found

    def _rebuilt_pointer(self, keep: int) -> Pointer | None:
        verified = []
        for key in self._listed_manifests():
            committed = self.verify(key)
            if committed is not None:
                verified.append(committed)
            if len(verified) == keep:
                break
        if not verified:
            return None
        newest = verified[0]
        log.warning(
            "checkpoint_pointer_rebuilt",
            manifest=newest.manifest_key,
            step=newest.step,
            history=[c.manifest_key for c in verified[1:]],
        )
        return Pointer(
            0, "", newest.manifest_key, newest.step, [c.manifest_key for c in verified[1:]]
        )

    def still_owner(self) -> bool:
        """Whether LATEST still names this writer as its owner (checked in storage)."""
        pointer, _ = self.read_pointer()
        return pointer is None or pointer.owner == self.writer

    def commit(
        self, local_dir: Path, step: int, keep: int, state: dict[str, Any] | None = None
    ) -> Committed:
        """Upload, then write the manifest, then move the pointer; then prune."""
        old = self.pointer.current
        if old is None:
            raise RuntimeError("claim() the run before committing")
        prefix = f"{self.writer}-step-{step:08d}"
        paths = sorted(p for p in local_dir.rglob("*") if p.is_file())
        if not paths:
            raise FileNotFoundError(f"{local_dir}: no checkpoint files to commit")
        files: dict[str, dict[str, Any]] = {}
        for path in paths:
            name = path.relative_to(local_dir).as_posix()
            files[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
            self.storage.upload_file(path, f"{prefix}/{name}")
        versions = checkpoint_versions()
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "writer": self.writer,
            "created_unix": time.time(),
            "files": files,
            "state": state,
            "versions": versions,
        }
        manifest_key = f"{prefix}/{MANIFEST_NAME}"
        self.storage.write_bytes(
            manifest_key, json.dumps(manifest, indent=1).encode(), if_none_match=True
        )
        history = [k for k in [old.manifest, *old.history] if k and k != manifest_key]
        history = history[: max(keep - 1, 0)]
        self.pointer.write(
            Pointer(old.generation, self.writer, manifest_key, step, history), self.pointer.tag
        )
        self._prune(keep=[manifest_key, *history])
        return Committed(step, manifest_key, files, state, versions)

    def _prune(self, keep: list[str]) -> None:
        """Delete the checkpoints the pointer no longer names. Safe only here, right after
        our own commit: our claim fenced every earlier writer, so their uncommitted files
        can never be committed, and we have no other upload in flight."""
        keep_prefixes = {k.rsplit("/", 1)[0] for k in keep}
        doomed = [
            o.key
            for o in self.storage.list_objects()
            if _STEP_DIR.match(o.key.split("/", 1)[0])
            and o.key.split("/", 1)[0] not in keep_prefixes
        ]
        if doomed:
            self.storage.delete(doomed)
