"""Checkpoint timings of a 7B-shaped job through the real entrypoint, on local storage.

python -m bench.preemption --out DIR

1. Run 1 (cold): `python entrypoint.py run -f job.yaml` with periodic checkpoints every
   few steps; after a few more steps, a real SIGTERM. Measured: SIGTERM -> the
   checkpoint_committed event, the exit code (75 expected), each checkpoint_saved's
   blocking_seconds, and process start -> first train_log.
2. Run 2 (restart): the same command; process start -> run_claimed -> resuming -> first
   train_log, against the cold run's model load (the product's loader, timed alone).
Times come from the JSON log's timestamps and this process's wall clock.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from bench.common import ensure_model_dir, text_rows, write_json

REPO = Path(__file__).resolve().parents[1]
EXIT_PREEMPTED = 75


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def run_entrypoint(manifest: Path, env: dict[str, str], sigterm_after_step: int | None) -> dict:
    started = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "entrypoint.py"), "run", "-f", str(manifest)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    events: list[dict[str, Any]] = []
    sigterm_at = None
    for line in proc.stderr:
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        events.append(event)
        step = event.get("step") if event.get("event") == "train_log" else None
        if (
            sigterm_at is None
            and step is not None
            and (sigterm_after_step is None or step >= sigterm_after_step)
        ):
            sigterm_at = time.time()
            proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    return {"started": started, "sigterm_at": sigterm_at, "exit_code": code, "events": events}


def first(events: list[dict[str, Any]], name: str, after: float = 0.0) -> dict[str, Any] | None:
    return next((e for e in events if e.get("event") == name and stamp(e) >= after), None)


def since(t0: float, event: dict[str, Any] | None) -> float | None:
    return round(stamp(event) - t0, 3) if event else None


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    events, t0, sig = run["events"], run["started"], run["sigterm_at"]
    saved = [e for e in events if e.get("event") == "checkpoint_saved"]
    out: dict[str, Any] = {
        "exit_code": run["exit_code"],
        "run_claimed_seconds": since(t0, first(events, "run_claimed")),
        "data_loaded_seconds": since(t0, first(events, "data_loaded")),
        "resuming_seconds": since(t0, first(events, "resuming")),
        "first_train_log_seconds": since(t0, first(events, "train_log")),
        "first_train_log_step": (first(events, "train_log") or {}).get("step"),
        "batch_size": (first(events, "batch_size_auto") or {}).get("batch_size"),
        "checkpoint_saved": [
            {"step": e["step"], "blocking_seconds": e["blocking_seconds"]} for e in saved
        ],
        "checkpoint_committed": [
            {
                "step": e["step"],
                "upload_seconds": e.get("upload_seconds"),
                "bytes": e.get("upload_bytes"),
            }
            for e in events
            if e.get("event") == "checkpoint_committed"
        ],
    }
    if sig is not None:
        requested = first(events, "preemption_requested")
        committed = first(events, "checkpoint_committed", after=sig)
        out["sigterm_at_step"] = max(
            (e["step"] for e in events if e.get("event") == "train_log" and stamp(e) <= sig),
            default=None,
        )
        out["sigterm_to_requested_seconds"] = since(sig, requested)
        out["sigterm_to_committed_seconds"] = since(sig, committed)
        out["committed_step"] = committed["step"] if committed else None
        out["mid_step_stop"] = first(events, "preemption_stop_mid_step") is not None
    crashed = first(events, "job_crashed")
    if crashed:
        out["crash"] = crashed.get("exception")
    return out


def cold_load_seconds(manifest: Path) -> float:
    """The product's loader alone, in a fresh process: 4-bit load + adapters."""
    code = (
        "import sys, time, torch; from service.manifest.spec import FineTuneJob; import yaml;"
        "from service import model as m;"
        "spec = FineTuneJob.model_validate(yaml.safe_load(open(sys.argv[1]))).spec;"
        "d = m.detect_device(); dt = m.resolve_compute_dtype('auto', d); t = time.monotonic();"
        "x = m.load_for_training(__import__('pathlib').Path(spec.model.source), spec, dt, d);"
        "torch.cuda.synchronize();"
        "print(time.monotonic() - t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(manifest)], capture_output=True, text=True, cwd=REPO
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spotlora-preempt"))
    parser.add_argument("--out", type=Path, default=Path("bench-results/preemption.json"))
    parser.add_argument("--every-steps", type=int, default=4)
    parser.add_argument("--sigterm-after-step", type=int, default=7)
    opts = parser.parse_args()
    model_dir = opts.model_dir or Path(f"/tmp/spotlora-bench/{opts.preset}")
    prepared = ensure_model_dir(opts.preset, model_dir)
    opts.work.mkdir(parents=True, exist_ok=True)
    data = opts.work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(4000)))
    doc = {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": "preempt-7b"},
        "spec": {
            "model": {"source": str(model_dir)},
            "data": {"train": str(data), "format": "text", "max_length": 512},
            "training": {"max_steps": 60, "logging_steps": 1},
            "checkpoint": {"every_steps": opts.every_steps, "every_seconds": 3600},
            "metrics": {"port": None},
            "output": {"uri": str(opts.work / "output")},
        },
    }
    manifest = opts.work / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {
        **os.environ,
        "SPOTLORA_CACHE_DIR": str(opts.work / "cache"),
        "SPOTLORA_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    result: dict[str, Any] = {"manifest": doc, "model_dir": prepared}
    result["cold_model_load_seconds"] = cold_load_seconds(manifest)
    print("cold model load", result["cold_model_load_seconds"], flush=True)
    cold = run_entrypoint(manifest, env, opts.sigterm_after_step)
    result["cold"] = summarize(cold)
    print("cold", json.dumps(result["cold"]), flush=True)
    restart = run_entrypoint(manifest, env, None)  # SIGTERM at its first step: resume timing
    result["restart"] = summarize(restart)
    print("restart", json.dumps(result["restart"]), flush=True)
    result["raw_events"] = {"cold": cold["events"], "restart": restart["events"]}
    write_json(opts.out, result)


if __name__ == "__main__":
    main()
