"""Render docs/report.png: a real CPU run, preempted twice, drawn by the run report.

    .venv/bin/python examples/readme_report.py [--dir DIR] [--png docs/report.png]

A tiny random-init Llama (examples/samples.py: its steps take milliseconds, so the picture
takes a minute or two on two busy cores) learns the quickstart's task through `spotlora run`
in a child process, three times over the same run identity:

1. SIGTERM at step 40, as a spot notice would send: the run commits and exits 75;
2. SIGKILL at step 95, a node lost without notice: the steps after its last checkpoint
   (step 80) are trained again;
3. the run resumes from step 80 and finishes at step 150.

Each attempt is priced from k8s/base/prices.yaml as a g4dn.xlarge (SPOTLORA_INSTANCE_TYPE),
so the bill is what the same minutes would cost there, spot against on demand. The picture is
service/report.py's, as `spotlora report` draws it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from examples.quickstart import SEED, job_manifest  # noqa: E402

PRICES = REPO / "k8s" / "base" / "prices.yaml"
INSTANCE_TYPE = "g4dn.xlarge"
MAX_STEPS = 150
CHECKPOINT_EVERY_STEPS = 20
# (step, signal): the first train_log at or past the step gets the signal.
PREEMPTIONS = ((40, signal.SIGTERM), (95, signal.SIGKILL))
EXPECTED_EXITS = (75, -signal.SIGKILL, 0)


def readme_job(model_dir: Path, train: Path, held_out: Path, output: Path) -> dict[str, Any]:
    """The quickstart's job, longer, checkpointed every 20 steps, without evaluation or export."""
    job = job_manifest(model_dir, train, held_out, output)
    job["metadata"]["name"] = "readme-report"
    spec = job["spec"]
    spec["training"].update(max_steps=MAX_STEPS, batch_size="auto", logging_steps=1)
    spec["checkpoint"] = {"every_steps": CHECKPOINT_EVERY_STEPS, "every_seconds": 3600}
    del spec["evaluation"], spec["export"]
    return job


def signal_for(step: int, attempt: int) -> int | None:
    """The signal this attempt sends at a logged step, if any: one per preempted attempt."""
    if attempt >= len(PREEMPTIONS):
        return None
    at, sig = PREEMPTIONS[attempt]
    return sig if step >= at else None


def run_attempt(job: Path, env: dict[str, str], attempt: int) -> int:
    """One `spotlora run` as a process of its own, signalled on its own log lines."""
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "entrypoint.py"), "run", "--manifest", str(job)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stderr is not None
    sent = False
    for line in proc.stderr:
        if sent or not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "train_log":
            sig = signal_for(int(event.get("step", 0)), attempt)
            if sig is not None:
                proc.send_signal(sig)
                sent = True
                name = signal.Signals(sig).name
                print(f"attempt {attempt + 1}: {name} at step {event['step']}", flush=True)
    return proc.wait()


def job_env(cache: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "SPOTLORA_CACHE_DIR": str(cache),
        "SPOTLORA_LOG_FORMAT": "json",
        "SPOTLORA_RUN_ID": "readme-report",
        "SPOTLORA_PRICE_TABLE": str(PRICES),
        "SPOTLORA_INSTANCE_TYPE": INSTANCE_TYPE,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",  # the tiny model gains nothing from more, on a shared machine
    }
    env.pop("SPOTLORA_MANIFEST", None)
    env.pop("SPOTLORA_MANIFEST_URI", None)
    return env


def render(run_json: Path, png: Path) -> Path:
    from service.report import plot

    png.parent.mkdir(parents=True, exist_ok=True)
    return plot(json.loads(run_json.read_text()), png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=REPO / "quickstart-out" / "readme-report")
    parser.add_argument("--png", type=Path, default=REPO / "docs" / "report.png")
    args = parser.parse_args()
    from examples.samples import write_synthetic_splits, write_tiny_llama

    shutil.rmtree(args.dir, ignore_errors=True)  # a finished run would not train again
    model_dir = write_tiny_llama(args.dir / "model", seed=SEED)
    train, held_out = write_synthetic_splits(args.dir / "data", n_train=400, n_eval=32, seed=SEED)
    output = args.dir / "output"
    job = args.dir / "job.yaml"
    job.write_text(yaml.safe_dump(readme_job(model_dir, train, held_out, output), sort_keys=False))
    env = job_env(args.dir / "cache")
    for attempt, expected in enumerate(EXPECTED_EXITS):
        code = run_attempt(job, env, attempt)
        print(f"attempt {attempt + 1}: exit {code}", flush=True)
        if code != expected:
            print(f"expected exit {expected}: see the log above", file=sys.stderr)
            return 1
    print(f"report: {render(output / 'run.json', args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
