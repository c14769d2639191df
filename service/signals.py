"""SIGTERM and SIGINT kept from the first instant of a job's process, before any library
imports (seconds, as PID 1 in a container, and more on a loaded node): the default action
would kill the process outright. The preemption watcher takes them over once it starts.
Standard library only, so the entrypoint can install it before importing anything else."""

from __future__ import annotations

import signal
import threading

_early: list[str] = []


def catch_early_signals() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _early.append(signal.Signals(signum).name))


def take_early_signals() -> list[str]:
    """The signals caught so far, oldest first, forgotten once taken."""
    taken = list(_early)
    del _early[: len(taken)]
    return taken
