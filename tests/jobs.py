"""Helpers to write small job manifests and run the real entrypoint as a process."""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "entrypoint.py"


def manifest(name: str, model: str, train: str, output: str, **sections: Any) -> dict[str, Any]:
    """A small, fast job; ``sections`` update the spec's sections, e.g. training={...}."""
    spec: dict[str, Any] = {
        "model": {"source": model},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": train, "format": "alpaca", "max_length": 96},
        "training": {
            "max_steps": 6,
            "batch_size": 2,
            "gradient_accumulation": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "seed": 7,
            "gradient_checkpointing": False,
        },
        "checkpoint": {"every_steps": 100, "every_seconds": 3600},
        "metrics": {"port": None},
        "output": {"uri": output},
    }
    for section, values in sections.items():
        spec.setdefault(section, {}).update(values)
    return {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def write_manifest(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def job_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "SPOTLORA_CACHE_DIR": str(cache_dir),
        "SPOTLORA_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
        # Runs are compared bit for bit across processes. With two OpenMP threads, about one
        # run in twelve computed the worker thread's half of the first RoPE cos ~1e-4 off
        # (torch 2.13 CPU); one thread is exact and no slower for these tiny models.
        "OMP_NUM_THREADS": "1",
    }
    for key in ("SPOTLORA_RUN_ID", "SPOTLORA_MANIFEST", "SPOTLORA_MANIFEST_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


def run_in_process(
    job: dict[str, Any], tmp_path: Path, name: str, monkeypatch: Any
) -> dict[int, float]:
    """Run ``job`` in this process, for a test that patches the service; its step losses."""
    from service.cli import main

    for key, value in job_env(tmp_path / f"cache-{name}").items():
        monkeypatch.setenv(key, value)
    assert main(["run", "-f", str(write_manifest(tmp_path / f"{name}.yaml", job))]) == 0
    return step_losses(json.loads((Path(job["spec"]["output"]["uri"]) / "run.json").read_text()))


@dataclass
class Finished:
    code: int
    events: list[dict[str, Any]]
    stderr: str
    signals_sent: list[tuple[str, float]] = field(default_factory=list)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


def parse_events(stderr: str) -> list[dict[str, Any]]:
    events = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def run_job(
    args: list[str],
    env: dict[str, str],
    *,
    timeout_seconds: float = 600,
    interrupt: Callable[[dict[str, Any]], int | tuple[int, float] | None] | None = None,
    kill_after_seconds: float | None = None,
    signal_after: tuple[int, float] | None = None,
    started: Callable[[subprocess.Popen[str]], None] | None = None,
) -> Finished:
    """Run ``entrypoint.py ARGS``; ``interrupt`` sees each log event and may return a signal
    to send at that moment, or (signal, delay in seconds) to send it later. ``started`` gets
    the process, for a test that must stop and continue it around a change of its own."""
    proc = subprocess.Popen(
        [sys.executable, str(ENTRYPOINT), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    if started is not None:
        started(proc)
    assert proc.stderr is not None
    lines: list[str] = []
    sent: list[tuple[str, float]] = []
    timers: list[threading.Timer] = []

    def send_later(sig: int, delay_seconds: float) -> None:
        def send() -> None:
            if proc.poll() is None:
                proc.send_signal(sig)
                sent.append((signal.Signals(sig).name, time.monotonic()))

        timers.append(threading.Timer(delay_seconds, send))
        timers[-1].start()

    if kill_after_seconds is not None:
        send_later(signal.SIGKILL, kill_after_seconds)
    if signal_after is not None:
        send_later(*signal_after)
    deadline = time.monotonic() + timeout_seconds
    for line in proc.stderr:
        lines.append(line)
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("job did not finish in time:\n" + "".join(lines[-20:]))
        if interrupt is not None and line.startswith("{"):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            decision = interrupt(event)
            if isinstance(decision, tuple):
                send_later(*decision)
            elif decision is not None:
                proc.send_signal(decision)
                sent.append((signal.Signals(decision).name, time.monotonic()))
    code = proc.wait(timeout=timeout_seconds)
    for timer in timers:
        timer.cancel()
    stderr = "".join(lines)
    return Finished(code, parse_events(stderr), stderr, sent)


def at_step(step: int, sig: int = signal.SIGTERM) -> Callable[[dict[str, Any]], int | None]:
    """Send ``sig`` once, at the first log of ``step`` or later."""
    sent = False

    def decide(event: dict[str, Any]) -> int | None:
        nonlocal sent
        if not sent and event.get("event") == "train_log" and event.get("step", 0) >= step:
            sent = True
            return sig
        return None

    return decide


def step_losses(run_record: dict[str, Any]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in run_record["log_history"] if "loss" in h}


def adapter_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


class RecordingGateway:
    """A stand-in Pushgateway that keeps every push, in order: the final phase alone does not
    show what a run went through."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                outer.bodies.append(self.rfile.read(length).decode())
                self.send_response(200)
                self.end_headers()

            do_PUT = do_POST

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def phases(self) -> list[str]:
        """The phase each push reported, consecutive repeats folded."""
        seen: list[str] = []
        for body in self.bodies:
            match = re.search(r'spotlora_job_phase\{spotlora_job_phase="(\w+)"\} 1\.0', body)
            if match and (not seen or seen[-1] != match[1]):
                seen.append(match[1])
        return seen
