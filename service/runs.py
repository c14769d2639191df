"""`spotlora runs`: the runs kept at a job's output URI, in either layout.

``list`` and ``show`` read a scheduled job's history (output.per_run). ``resume`` names the
run identity that picks a stopped run up again, for a Job that failed (backoffLimit,
activeDeadlineSeconds) after committing checkpoints: a new Job gets a new uid, and so a new
run, unless SPOTLORA_RUN_ID is set to the old one. ``prune`` deletes old runs' outputs
(runs/<id>/) and checkpoints (under the default prefix, checkpoints/<id>/, or --checkpoints),
dry run unless --yes.

A run is in progress when it has no finished run.json and something of it was written in
the last IN_PROGRESS_SECONDS: prune never deletes it, nor the published run (PUBLISHED, or in
the single-run layout the run whose run.json is at the root).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field

from service.checkpoint.store import POINTER_KEY, Pointer
from service.errors import ExitCode, ManifestError
from service.history import PUBLISHED_KEY, RUNS_PREFIX, RunHistory
from service.storage import Storage, open_storage, uri_join
from service.uris import check_key_segment, check_storage_uri

RUN_RECORD = "run.json"
DONE = ("succeeded", "skipped")
# Twice the base Job's activeDeadlineSeconds: no pod of a Job is still running after it.
IN_PROGRESS_SECONDS = 2 * 86400


@dataclass
class Run:
    run_id: str
    status: str = "unfinished"  # or the finished run.json's status
    committed_step: int | None = None
    last_write_unix: float = 0.0
    objects: list[tuple[Storage, str]] = field(default_factory=list)
    size_bytes: int = 0

    def in_progress(self, now: float) -> bool:
        return self.status not in DONE and now - self.last_write_unix < IN_PROGRESS_SECONDS


def _check_uri(command: str, uri: str) -> None:
    try:
        check_storage_uri(uri)
    except ValueError as err:
        raise ManifestError(f"runs {command}: URI {uri!r}: {err}") from None


def _status(storage: Storage, key: str, run_id: str | None = None) -> str | None:
    """A finished run.json's status (of ``run_id``, when given), else None."""
    try:
        record = json.loads(storage.read_bytes(key))
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(record, dict) or (run_id and record.get("run_id") != run_id):
        return None
    status = record.get("status")
    return status if status in DONE else None


def scan(output: Storage, checkpoints: Storage) -> tuple[dict[str, Run], str | None]:
    """Every run with outputs or checkpoints here, and the published run's id."""
    runs: dict[str, Run] = {}
    for store in (output.child(RUNS_PREFIX), checkpoints):
        for obj in store.list_objects():
            if "/" not in obj.key:
                continue  # a stray object beside the runs
            run = runs.setdefault(obj.key.split("/")[0], Run(obj.key.split("/")[0]))
            run.objects.append((store, obj.key))
            run.size_bytes += obj.size
            run.last_write_unix = max(run.last_write_unix, obj.modified_unix)
    for run in runs.values():
        finished = _status(output, f"{RUNS_PREFIX}/{run.run_id}/{RUN_RECORD}")
        run.status = finished or run.status
        try:
            pointer = Pointer.parse(checkpoints.read_bytes(f"{run.run_id}/{POINTER_KEY}"))
        except (FileNotFoundError, ValueError):
            continue
        run.committed_step = pointer.step if pointer.manifest else None
    published = None
    if output.head(PUBLISHED_KEY) is not None:
        published = RunHistory(output).published()[0]
        return runs, published["run_id"] if published else None
    try:  # the single-run layout: the run whose record is at the root holds the outputs
        root = json.loads(output.read_bytes(RUN_RECORD))
    except (FileNotFoundError, ValueError):
        return runs, None
    current = root.get("run_id") if isinstance(root, dict) else None
    if not isinstance(current, str):
        return runs, None
    if current in runs and _status(output, RUN_RECORD, current):
        runs[current].status = root["status"]
    return runs, current


def _stores(args: argparse.Namespace) -> tuple[Storage, Storage]:
    _check_uri(args.runs_command, args.uri)
    if args.checkpoints:
        _check_uri(args.runs_command, args.checkpoints)
    output = open_storage(args.uri)
    return output, open_storage(args.checkpoints or uri_join(output.uri, "checkpoints"))


def _when(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))


def resume(args: argparse.Namespace) -> ExitCode:
    """Print SPOTLORA_RUN_ID=<id> for the stopped run to pick up (the newest, or RUN_ID)."""
    runs, _ = scan(*_stores(args))
    stopped = [r for r in runs.values() if r.status not in DONE and r.committed_step]
    if args.run_id:
        try:
            check_key_segment(args.run_id)
        except ValueError as err:
            raise ManifestError(f"runs resume: RUN {args.run_id!r}: {err}") from None
        run = runs.get(args.run_id)
        if run is None or run not in stopped:
            why = "no such run" if run is None else f"status {run.status}, no checkpoint to resume"
            raise ManifestError(f"runs resume: {args.uri}: run {args.run_id!r}: {why}")
    elif not stopped:
        raise ManifestError(f"runs resume: {args.uri}: no unfinished run with a checkpoint")
    else:
        run = max(stopped, key=lambda r: r.last_write_unix)
    for other in sorted(stopped, key=lambda r: -r.last_write_unix):
        sys.stderr.write(
            f"# {other.run_id}: committed step {other.committed_step}, last written "
            f"{_when(other.last_write_unix)} UTC{'  <- this one' if other is run else ''}\n"
        )
    sys.stderr.write(
        "# run the same manifest with this in the environment (in a new Job, in place of the "
        "uid fieldRef): it resumes at the committed step\n"
    )
    sys.stdout.write(f"SPOTLORA_RUN_ID={run.run_id}\n")
    return ExitCode.OK


def prune(args: argparse.Namespace) -> ExitCode:
    """Delete (with --yes) the runs beyond the newest --keep, or older than --older-than days."""
    if (args.keep is not None and args.keep < 0) or (
        args.older_than is not None and args.older_than < 0
    ):
        raise ManifestError("runs prune: --keep and --older-than take a number >= 0")
    runs, published = scan(*_stores(args))
    now = time.time()
    newest = sorted(runs.values(), key=lambda r: -r.last_write_unix)
    for rank, run in enumerate(newest):
        if run.run_id == published:
            verdict = "keep (published)"
        elif run.in_progress(now):
            verdict = "keep (in progress)"
        elif args.keep is not None and rank < args.keep:
            verdict = f"keep (newest {args.keep})"
        elif args.older_than is not None and now - run.last_write_unix < args.older_than * 86400:
            verdict = f"keep (newer than {args.older_than:g} days)"
        else:
            verdict = "deleted" if args.yes else "would delete"
            if args.yes:
                for store in {id(s): s for s, _ in run.objects}.values():
                    store.delete([k for s, k in run.objects if s is store])
        sys.stdout.write(
            f"{verdict:28} {run.run_id:36} {run.status:10} {_when(run.last_write_unix)}  "
            f"{len(run.objects):>6} objects {run.size_bytes / 2**20:>10.1f} MiB\n"
        )
    if not args.yes and newest:
        sys.stdout.write("# a dry run: nothing was deleted; add --yes to delete\n")
    return ExitCode.OK


def show_runs(args: argparse.Namespace) -> ExitCode:
    """`runs list` and `runs show`: a scheduled job's history (output.per_run)."""
    from service.estimate import versus

    try:
        check_storage_uri(args.uri)
    except ValueError as err:
        raise ManifestError(f"runs {args.runs_command}: URI {args.uri!r}: {err}") from None
    if args.runs_command == "show":
        try:
            check_key_segment(args.run_id)
        except ValueError as err:
            raise ManifestError(f"runs show: RUN {args.run_id!r}: {err}") from None
    history = RunHistory(open_storage(args.uri))
    if args.runs_command == "show":
        try:
            record = history.run_storage(args.run_id).read_bytes("run.json")
        except FileNotFoundError:
            raise ManifestError(f"{args.uri}: no run {args.run_id!r} with a run.json") from None
        sys.stdout.write(record.decode() + "\n")
        return ExitCode.OK
    published, _ = history.published()
    current = published["run_id"] if published else None
    sys.stdout.write(
        f"{'RUN':24} {'STARTED (UTC)':20} {'STATUS':10} {'STEPS':>6} {'EVAL LOSS':>10} "
        f"{'ATTEMPTS':>8} {'COST $':>11} {'LOST $':>11} {'LOST MIN':>8} "
        f"{'MIN EST/ACT':>13} {'EST $':>9}  PUBLISHED  REASON\n"
    )
    for e in history.entries():
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["started_unix"]))
        eval_loss = (e.get("losses") or {}).get("final_eval")
        loss = f"{eval_loss:.4f}" if isinstance(eval_loss, float) else "-"
        mark = "*" if e["run_id"] == current else ("yes" if e["promoted"] else "no")
        cost = e.get("cost") or {}
        lost_minutes = (cost.get("lost_work_seconds", 0) + cost.get("restart_seconds", 0)) / 60
        sys.stdout.write(
            f"{e['run_id']:24} {started:20} {e['status']:10} {e.get('steps') or 0:>6} "
            f"{loss:>10} {cost.get('attempts', '-'):>8} {_dollars(cost.get('total_usd')):>11} "
            f"{_dollars(cost.get('lost_to_preemption_usd')):>11} {lost_minutes:>8.1f} "
            f"{versus(e.get('estimate'), cost)}  "
            f"{mark:9}  {e.get('reason', '')}\n"
        )
    return ExitCode.OK


def _dollars(value: float | None) -> str:
    return "-" if value is None else f"{value:.6f}"


COMMANDS = {"list": show_runs, "show": show_runs, "resume": resume, "prune": prune}


def add_commands(runs: argparse._SubParsersAction) -> None:
    def checkpoints_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("uri", help="the job's output URI (spec.output.uri)")
        p.add_argument(
            "--checkpoints",
            metavar="URI",
            help="spec.checkpoint.uri when the job sets one; default URI/checkpoints/",
        )

    resume_p = runs.add_parser(
        "resume", help="print the SPOTLORA_RUN_ID that resumes a stopped run (a failed Job)"
    )
    checkpoints_arg(resume_p)
    resume_p.add_argument("run_id", nargs="?", help="default: the newest unfinished run")
    prune_p = runs.add_parser(
        "prune", help="delete old runs' outputs and checkpoints (a dry run without --yes)"
    )
    checkpoints_arg(prune_p)
    which = prune_p.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep", type=int, metavar="N", help="keep the newest N runs")
    which.add_argument(
        "--older-than", type=float, metavar="DAYS", help="delete runs last written before"
    )
    prune_p.add_argument("--yes", action="store_true", help="delete (default: only print)")
