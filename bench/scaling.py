"""Scale-out on one host: 1 GPU vs N GPUs, and a preempt/resume across all ranks, through the
product's own commands.

python -m bench.scaling --out DIR [--nproc 2] [--batch-size 32] [--max-steps 12]

1. Single: `python entrypoint.py run -f job.yaml` (one process, one GPU), max_steps steps.
2. Multi: `python entrypoint.py launch --nproc-per-node N -- run -f job.yaml`, the same
   per-GPU micro-batch, same steps (each optimizer step then consumes N x the sequences).
   Tokens/s for both: trl's `num_tokens` (cumulative non-padding tokens, summed over ranks)
   between the train_log after the warm-up steps and the last one, over the JSON log's
   timestamps between them. Scaling efficiency = tokens/s(N) / (N x tokens/s(1)).
3. Preempt: the multi-GPU command with checkpoints off except the final one; SIGTERM to the
   launcher process once rank 0 logs step --sigterm-after-step. Expected: exit 75, one
   committed checkpoint.
4. Resume: the same command again. Expected: every rank logs `resuming` at the committed
   step, training goes on from there to max_steps, exit 0.

The model is the random-init Mistral-7B shape of bench/common.py, saved to local disk once;
`--model-dir` takes any saved model instead (a tiny one for a CPU dry run, with gloo).
"""

from __future__ import annotations

import argparse
import itertools
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

from bench.common import text_rows, write_json

REPO = Path(__file__).resolve().parents[1]


def stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def run_command(
    argv: list[str], env: dict[str, str], log_path: Path, sigterm_after_step: int | None = None
) -> dict[str, Any]:
    """Runs one product command, keeps its JSON log events (stdout and stderr merged, the
    workers' lines included), and sends SIGTERM to that process (the launcher, not the
    workers) once rank 0 has logged the given step."""
    started = time.time()
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )
    assert proc.stdout is not None
    events: list[dict[str, Any]] = []
    sigterm_at = None
    with log_path.open("w") as raw:
        raw.write("$ " + " ".join(argv) + "\n")
        for line in proc.stdout:
            raw.write(line)
            start = line.find("{")
            if start < 0:
                continue
            try:
                event = json.loads(line[start:])
            except ValueError:
                continue
            if not isinstance(event, dict) or "event" not in event:
                continue
            events.append(event)
            if (
                sigterm_after_step is not None
                and sigterm_at is None
                and event["event"] == "train_log"
                and event.get("rank", 0) == 0
                and event.get("step", 0) >= sigterm_after_step
            ):
                sigterm_at = time.time()
                proc.send_signal(signal.SIGTERM)
        code = proc.wait()
        raw.write(f"# exit {code}\n")
    return {
        "argv": argv,
        "started": started,
        "wall_seconds": round(time.time() - started, 2),
        "sigterm_at": sigterm_at,
        "exit_code": code,
        "events": events,
    }


def of_rank(events: list[dict[str, Any]], name: str, rank: int = 0) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == name and e.get("rank", 0) == rank]


def packed_row_tokens(rows: int, max_length: int) -> dict[str, Any]:
    """Mean non-padding tokens in a packed row: the rows' token counts (n - 1 words + EOS, see
    common.text_rows) packed as the product packs them (trl's best-fit-decreasing)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    from bench.common import sequence_lengths

    lengths = sequence_lengths(rows)
    packed = pack_dataset(
        Dataset.from_dict({"input_ids": [[5] * n for n in lengths]}), max_length, strategy="bfd"
    )
    sizes = [len(x) for x in packed["input_ids"]]
    return {
        "rows": rows,
        "tokens": sum(lengths),
        "packed_rows": len(sizes),
        "mean_packed_row_tokens": sum(sizes) / len(sizes),
    }


def throughput(
    history: list[dict[str, Any]], warmup: int, tokens_per_step: float
) -> dict[str, Any]:
    """Non-padding tokens/s from the run record's log_history (rank 0's trainer; the wall time
    MetricsCallback stamps on each entry) after `warmup` steps. Tokens per step: sequences per
    step x the mean packed row's tokens. trl's `num_tokens` is kept for the record only: with
    the product's packed-rows collator (positions, no attention mask) it counts the batch's
    width (max_length per micro-batch), not its tokens."""
    logs = [e for e in history if "time" in e and "loss" in e]
    after = [e for e in logs if e["step"] >= warmup]
    if len(after) < 2:
        return {"error": f"{len(logs)} log_history entries, too few after step {warmup}"}
    a, b = after[0], after[-1]
    seconds = b["time"] - a["time"]
    steps = b["step"] - a["step"]
    return {
        "from_step": a["step"],
        "to_step": b["step"],
        "seconds": round(seconds, 3),
        "seconds_per_step": round(seconds / steps, 4),
        "tokens_per_step": round(tokens_per_step, 1),
        "tokens_per_second": round(tokens_per_step * steps / seconds, 1),
        "trl_num_tokens_per_step": (b.get("num_tokens", 0) - a.get("num_tokens", 0)) / steps,
        "step_seconds": [round(y["time"] - x["time"], 3) for x, y in itertools.pairwise(logs)],
    }


def history(job: Path) -> list[dict[str, Any]]:
    record = Path(yaml.safe_load(job.read_text())["spec"]["output"]["uri"]) / "run.json"
    if not record.is_file():
        return []
    return list(json.loads(record.read_text()).get("log_history", []))


def ranks_seen(events: list[dict[str, Any]]) -> list[int]:
    return sorted({int(e.get("rank", 0)) for e in events})


def preempt_summary(run: dict[str, Any]) -> dict[str, Any]:
    events, sig = run["events"], run["sigterm_at"]
    committed = [e for e in events if e.get("event") == "checkpoint_committed"]
    return {
        "exit_code": run["exit_code"],
        "wall_seconds": run["wall_seconds"],
        "ranks": ranks_seen(events),
        "sigterm_at_step": max(
            (e["step"] for e in of_rank(events, "train_log") if stamp(e) <= (sig or 0)),
            default=None,
        ),
        "committed_steps": [e["step"] for e in committed],
        "sigterm_to_committed_seconds": round(stamp(committed[-1]) - sig, 3)
        if committed and sig
        else None,
        "preempted_event": [
            {"rank": e.get("rank", 0), "step": e.get("step")}
            for e in events
            if e.get("event") in ("preempted", "preemption_requested")
        ],
        "crash": [e.get("exception") for e in events if e.get("event") == "job_crashed"],
    }


def resume_summary(run: dict[str, Any]) -> dict[str, Any]:
    events = run["events"]
    out: dict[str, Any] = {
        "exit_code": run["exit_code"],
        "wall_seconds": run["wall_seconds"],
        "ranks": ranks_seen(events),
        "per_rank": {},
        "crash": [e.get("exception") for e in events if e.get("event") == "job_crashed"],
    }
    for rank in out["ranks"]:
        resuming = of_rank(events, "resuming", rank)
        steps = [e["step"] for e in of_rank(events, "train_log", rank) if "loss" in e]
        out["per_rank"][rank] = {
            "resuming_step": resuming[0]["step"] if resuming else None,
            "first_train_log_step": steps[0] if steps else None,
            "last_train_log_step": steps[-1] if steps else None,
        }
    return out


def manifest(work: Path, name: str, model_dir: Path, data: Path, opts: argparse.Namespace) -> Path:
    doc = {
        "apiVersion": "spotlora/v1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": str(model_dir)},
            "data": {"train": str(data), "format": "text", "max_length": 512},
            "training": {
                "max_steps": opts.max_steps,
                "batch_size": opts.batch_size,
                "logging_steps": 1,
            },
            # Only the final (preemption) checkpoint: no periodic one inside the timed steps.
            "checkpoint": {"every_steps": 100000, "every_seconds": 36000},
            "metrics": {"port": None},
            "output": {"uri": str(work / name / "output")},
        },
    }
    path = work / name / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="mistral-7b")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/spotlora-scaling"))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--sigterm-after-step", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--skip", action="append", default=[], help="single|multi|preempt")
    opts = parser.parse_args()

    opts.out.mkdir(parents=True, exist_ok=True)
    model_dir = opts.model_dir or Path(f"/tmp/spotlora-bench/{opts.preset}")
    result: dict[str, Any] = {"options": {k: str(v) for k, v in vars(opts).items()}}
    if opts.model_dir is None:
        from bench.common import ensure_model_dir, environment

        result["model_dir"] = ensure_model_dir(opts.preset, model_dir)
        result["environment"] = environment()
        print("model dir", result["model_dir"], flush=True)
    opts.work.mkdir(parents=True, exist_ok=True)
    data = opts.work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in text_rows(opts.rows)))
    env = {
        **os.environ,
        "SPOTLORA_CACHE_DIR": str(opts.work / "cache"),
        "SPOTLORA_LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    entry = [sys.executable, str(REPO / "entrypoint.py")]
    launch = [*entry, "launch", "--nproc-per-node", str(opts.nproc), "--"]
    out_json = opts.out / "scaling.json"
    raw: dict[str, Any] = {}

    def save() -> None:
        write_json(out_json, result)
        write_json(opts.out / "scaling-events.json", raw)

    packing = packed_row_tokens(opts.rows, 512)
    result["packing"] = packing
    per_gpu_step = opts.batch_size * packing["mean_packed_row_tokens"]
    if "single" not in opts.skip:
        job = manifest(opts.work, "single", model_dir, data, opts)
        # One process on a host of several GPUs: it must see one (trl refuses DataParallel).
        one_gpu = {**env, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES", "0")[:1]}
        run = run_command([*entry, "run", "-f", str(job)], one_gpu, opts.out / "single.log")
        raw["single"] = run["events"]
        result["single"] = {
            "exit_code": run["exit_code"],
            "wall_seconds": run["wall_seconds"],
            **throughput(history(job), opts.warmup, per_gpu_step),
        }
        print("single", json.dumps(result["single"]), flush=True)
        save()
    if "multi" not in opts.skip:
        job = manifest(opts.work, "multi", model_dir, data, opts)
        run = run_command([*launch, "run", "-f", str(job)], env, opts.out / "multi.log")
        raw["multi"] = run["events"]
        result["multi"] = {
            "exit_code": run["exit_code"],
            "wall_seconds": run["wall_seconds"],
            "ranks": ranks_seen(run["events"]),
            **throughput(history(job), opts.warmup, per_gpu_step * opts.nproc),
        }
        print("multi", json.dumps(result["multi"]), flush=True)
        one = result.get("single", {}).get("tokens_per_second")
        many = result["multi"].get("tokens_per_second")
        if one and many:
            result["speedup"] = round(many / one, 3)
            result["scaling_efficiency"] = round(many / (opts.nproc * one), 3)
            print("speedup", result["speedup"], "efficiency", result["scaling_efficiency"])
        save()
    if "preempt" not in opts.skip:
        job = manifest(opts.work, "preempt", model_dir, data, opts)
        run = run_command(
            [*launch, "run", "-f", str(job)],
            env,
            opts.out / "preempt.log",
            sigterm_after_step=opts.sigterm_after_step,
        )
        raw["preempt"] = run["events"]
        result["preempt"] = preempt_summary(run)
        print("preempt", json.dumps(result["preempt"]), flush=True)
        save()
        run = run_command([*launch, "run", "-f", str(job)], env, opts.out / "resume.log")
        raw["resume"] = run["events"]
        result["resume"] = resume_summary(run)
        print("resume", json.dumps(result["resume"]), flush=True)
        save()


if __name__ == "__main__":
    main()
