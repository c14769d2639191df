"""Outcomes a job can end in, each with its documented exit code.

The Kubernetes Job's podFailurePolicy is written against these numbers, so
they are a public contract: change them only together with k8s/base.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1
    INVALID_INPUT = 2  # manifest or usage: never worth retrying
    DATA_UNUSABLE = 65  # EX_DATAERR
    DEPENDENCY_UNREACHABLE = 69  # EX_UNAVAILABLE: storage or model source, after retries
    PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint is committed, run me again


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
    exit_code = ExitCode.PREEMPTED
