"""Several processes, one run: rank identity, agreement between ranks, and the launcher's
exit code.

Processes come from torchrun (``spotlora launch`` wraps it only to keep the service's exit
codes: torchrun reports any worker failure as its own exit 1, which would hide "preempted,
resume me" from the Kubernetes Job). Within a run every rank trains; only rank 0 writes to
storage; all ranks stop at the same step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from service.errors import ExitCode

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env() -> Ranks:
    """torchrun's variables; a plain process is rank 0 of 1."""
    return Ranks(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
    )


def init_process_group(ranks: Ranks) -> None:
    """Join the ranks early, so they can agree before the trainer exists; accelerate then
    reuses this group."""
    if not ranks.distributed or _initialized():
        return
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ranks.local_rank))
    else:
        dist.init_process_group("gloo")


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag true on every rank when it is true on any: a stop request seen by one rank
    (its signal, its spot notice) or a checkpoint falling due on one rank's clock applies to
    all of them at the same step. One small all-reduce for all the flags."""
    if not _initialized():
        return flags
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in value.tolist())


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def broadcast(value: object) -> object:
    """Rank 0's value, on every rank."""
    if not _initialized():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: object) -> list[object] | None:
    """Every rank's value, in rank order, on rank 0 (None elsewhere)."""
    if not _initialized():
        return [value]
    import torch.distributed as dist

    out: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, out, dst=0)
    return out


def launcher_exit_code(worker_codes: Sequence[int]) -> ExitCode:
    """One exit code for the pod from its workers': the most specific non-zero wins, and a
    preemption only when no rank failed for another reason (75 when any rank saw progress)."""
    failed = [c for c in worker_codes if c != 0]
    if not failed:
        return ExitCode.OK
    for code in (
        ExitCode.INVALID_INPUT,
        ExitCode.DATA_UNUSABLE,
        ExitCode.PUBLICATION_CONFLICT,
        ExitCode.SUPERSEDED,
        ExitCode.DEPENDENCY_UNREACHABLE,
    ):
        if code in failed:
            return code
    preempted = (ExitCode.PREEMPTED, ExitCode.PREEMPTED_NO_PROGRESS)
    if all(c in preempted for c in failed):
        if ExitCode.PREEMPTED in failed:
            return ExitCode.PREEMPTED
        return ExitCode.PREEMPTED_NO_PROGRESS
    return ExitCode.UNEXPECTED


# Every worker leaves its exit code in this folder for its own node's launcher: when the
# launcher itself is signalled, torchrun stops the workers and keeps no exit codes.
OUTCOME_DIR_ENV = "SPOTLORA_OUTCOME_DIR"


def record_outcome(code: int) -> None:
    """A launched worker's exit code, for the launcher of its pod (each pod's own ranks: a
    pod without rank 0 must still exit with what its ranks saw)."""
    folder = os.environ.get(OUTCOME_DIR_ENV)
    if folder:
        try:
            (Path(folder) / f"rank-{ranks_from_env().rank}").write_text(str(int(code)))
        except OSError as err:
            log.warning("outcome_not_recorded", error=str(err))


def recorded_outcome(folder: Path, workers: int) -> ExitCode:
    """The pod's exit code after its launcher was signalled: its own workers' outcomes. A
    worker that recorded none (killed at torchrun's shutdown timeout, or before it could
    say) counts as a stop without progress, 76, which the Job counts: a pod that cannot
    know whether the run moved forward must not exit 75, which the Job ignores forever."""
    codes: list[int] = []
    for path in sorted(folder.glob("rank-*")):
        try:
            codes.append(int(path.read_text().strip()))
        except (OSError, ValueError):
            continue
    unknown = max(workers - len(codes), 0)
    return launcher_exit_code([*codes, *[ExitCode.PREEMPTED_NO_PROGRESS] * unknown])


def launch(argv: Sequence[str]) -> ExitCode:
    """``spotlora launch [torchrun flags] -- run --manifest ...``: torchrun, with the
    service's exit codes. A SIGTERM to the launcher is forwarded by torchrun to every worker,
    which commit one checkpoint and exit; the launcher then exits with its own workers'
    outcome (75 or 76 by whether the run committed progress; 76 when one recorded none)."""
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import determine_local_world_size, get_args_parser
    from torch.distributed.run import run as torchrun

    argv = list(argv)
    if "--" not in argv:
        from service.errors import ManifestError

        raise ManifestError("usage: spotlora launch [torchrun flags] -- run --manifest FILE")
    split = argv.index("--")
    args = get_args_parser().parse_args([*argv[:split], "-m", "service", *argv[split + 1 :]])
    with tempfile.TemporaryDirectory(prefix="spotlora-launch-") as tmp:
        os.environ[OUTCOME_DIR_ENV] = tmp
        try:
            torchrun(args)
        except ChildFailedError as err:
            codes = [f.exitcode for f in err.failures.values()]
            code = launcher_exit_code(codes)
            log.warning("workers_failed", exit_codes=codes, exit_code=int(code))
            return code
        except SignalException as err:
            code = recorded_outcome(Path(tmp), determine_local_world_size(args.nproc_per_node))
            log.warning("launcher_signalled", signal=str(err.sigval), exit_code=int(code))
            return code
    return ExitCode.OK
