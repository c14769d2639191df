"""`spotlora runs prune`: old runs' outputs and checkpoints go; the published run and runs in
progress stay, whatever the selection says."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from service.cli import main
from service.storage import Storage, open_storage

DAY = 86400


def put_run(output: Storage, run_id: str, status: str | None) -> None:
    """A run's outputs (a run.json when it finished) and checkpoints under the default prefix."""
    run = output.child(f"runs/{run_id}")
    run.write_bytes("adapter/adapter_model.safetensors", b"w" * 100)
    if status is not None:
        run.write_bytes("run.json", json.dumps({"run_id": run_id, "status": status}).encode())
    ckpt = output.child(f"checkpoints/{run_id}")
    ckpt.write_bytes("pod-a-step-00000004/adapter_model.safetensors", b"c" * 100)
    ckpt.write_bytes("attempts/pod-a.json", b"{}")


def age(root: Path, run_id: str, days: float) -> None:
    """Make a local run's files as old as a run last written ``days`` ago."""
    when = time.time() - days * DAY
    for top in (root / "runs" / run_id, root / "checkpoints" / run_id):
        for path in top.rglob("*"):
            os.utime(path, (when, when))


def prune(uri: str, *flags: str, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    assert main(["runs", "prune", uri, *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line[29:].split()[0]: line[:29].strip() for line in lines if "objects" in line}


def keys(storage: Storage, prefix: str) -> list[str]:
    return [o.key for o in storage.list_objects(prefix)]


def test_prune_older_than_deletes_old_runs_only_with_yes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "job"
    output = open_storage(str(root))
    for run_id, status in [("old", "succeeded"), ("failed", None), ("pub", "succeeded")]:
        put_run(output, run_id, status)
        age(root, run_id, 30)
    put_run(output, "stale", None)
    age(root, "stale", 3)  # unfinished, but silent for longer than any Job lives
    put_run(output, "live", None)  # unfinished and written just now: in progress
    put_run(output, "new", "succeeded")
    output.write_bytes("PUBLISHED", json.dumps({"run_id": "pub"}).encode())

    verdicts = prune(str(root), "--older-than", "2", capsys=capsys)
    assert verdicts == {
        "old": "would delete",
        "failed": "would delete",
        "stale": "would delete",
        "pub": "keep (published)",
        "live": "keep (in progress)",
        "new": "keep (newer than 2 days)",
    }
    assert keys(output, "runs/old/") and keys(output, "checkpoints/failed/")  # a dry run

    assert prune(str(root), "--older-than", "2", "--yes", capsys=capsys)["old"] == "deleted"
    for gone in ("old", "failed", "stale"):
        assert not keys(output, f"runs/{gone}/") and not keys(output, f"checkpoints/{gone}/")
    for kept in ("pub", "live", "new"):
        assert keys(output, f"runs/{kept}/") and keys(output, f"checkpoints/{kept}/")
    assert output.head("PUBLISHED") is not None


def test_prune_keep_on_s3_never_deletes_the_published_run_or_one_in_progress(
    bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{bucket}/jobs/nightly/"
    output = open_storage(uri)
    for run_id, status in [("pub", "succeeded"), ("a", "succeeded"), ("skip", "skipped")]:
        put_run(output, run_id, status)
    put_run(output, "live", None)
    output.write_bytes("PUBLISHED", json.dumps({"run_id": "pub"}).encode())

    assert prune(uri, "--keep", "0", capsys=capsys) == {
        "pub": "keep (published)",
        "a": "would delete",
        "skip": "would delete",
        "live": "keep (in progress)",
    }
    assert len(keys(output, "")) == 3 * 4 + 3 + 1  # nothing deleted
    prune(uri, "--keep", "0", "--yes", capsys=capsys)
    assert sorted({k.split("/")[1] for k in keys(output, "runs/")}) == ["live", "pub"]
    assert sorted({k.split("/")[1] for k in keys(output, "checkpoints/")}) == ["live", "pub"]


def test_prune_in_the_single_run_layout_keeps_the_run_whose_outputs_are_at_the_root(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each Job of a single-run job (output.per_run off) leaves checkpoints/<its uid>/."""
    root = tmp_path / "job"
    output = open_storage(str(root))
    for run_id in ("uid-1", "uid-2"):
        output.child(f"checkpoints/{run_id}").write_bytes("pod-step-00000002/a.bin", b"x")
        age(root, run_id, 10)
    output.write_bytes("run.json", json.dumps({"run_id": "uid-2", "status": "succeeded"}).encode())
    assert prune(str(root), "--keep", "0", capsys=capsys) == {
        "uid-1": "would delete",
        "uid-2": "keep (published)",
    }


def test_prune_needs_a_selection(tmp_path: Path) -> None:
    assert main(["runs", "prune", str(tmp_path)]) == 2
    assert main(["runs", "prune", str(tmp_path), "--keep", "-1"]) == 2
