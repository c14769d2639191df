"""Outcomes a job can end in, each with its documented exit code.

The Kubernetes Job's podFailurePolicy is written against these numbers, so
they are a public contract: change them only together with k8s/ and README.md.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    INVALID_INPUT = 2  # manifest or usage: never worth retrying
    DATA_UNUSABLE = 65  # EX_DATAERR
    DEPENDENCY_UNREACHABLE = 69  # EX_UNAVAILABLE: storage or model source, after retries
    PREEMPTED = 75  # EX_TEMPFAIL: stopped early, progress committed beyond the last attempt's
    PREEMPTED_NO_PROGRESS = 76  # stopped early before committing new progress: counted
    SUPERSEDED = 77  # a newer pod took over this run; this one stopped without writing
    PUBLICATION_CONFLICT = 78  # another run moved PUBLISHED first; this run's record says so


class SpotloraError(Exception):
    """An expected failure: its message is what the user reads, without a traceback."""

    exit_code: ExitCode = ExitCode.UNEXPECTED


class ManifestError(SpotloraError):
    exit_code = ExitCode.INVALID_INPUT


class DataError(SpotloraError):
    exit_code = ExitCode.DATA_UNUSABLE


class DependencyError(SpotloraError):
    exit_code = ExitCode.DEPENDENCY_UNREACHABLE


class Preempted(SpotloraError):
    """The run stopped early. Whether this attempt moved the run forward decides the code:
    the Job ignores a preemption that made progress and counts one that made none, so a
    pod that keeps stopping before its first commit cannot churn forever."""

    def __init__(self, message: str, *, progress: bool) -> None:
        super().__init__(message)
        self.progress = progress
        self.exit_code = ExitCode.PREEMPTED if progress else ExitCode.PREEMPTED_NO_PROGRESS


class Superseded(SpotloraError):
    """Another process took over this run; this one must stop writing."""

    exit_code = ExitCode.SUPERSEDED


class PublicationConflict(SpotloraError):
    """PUBLISHED moved while this run decided whether to promote itself."""

    exit_code = ExitCode.PUBLICATION_CONFLICT
