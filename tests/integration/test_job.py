"""The real entrypoint, as a process: outputs, exit codes and what is left behind."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pytest

from tests.jobs import job_env, manifest, run_job, write_manifest


def test_job_writes_adapter_then_run_record(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    # One epoch: every training row is trained on exactly once, so the token count is known.
    job = manifest(
        "tiny-local",
        str(tiny_model),
        str(tiny_data),
        str(out),
        data={"eval_fraction": 0.1},
        training={"max_steps": None, "epochs": 1},
        evaluation={"samples": 2, "metrics": ["exact_match", "contains"], "max_new_tokens": 8},
        tracking={"tensorboard": True, "mlflow_tracking_uri": str(tmp_path / "mlruns")},
        export={"merged": True},
    )
    path = write_manifest(tmp_path / "job.yaml", job)
    env = job_env(tmp_path / "cache")
    done = run_job(["run", "--manifest", str(path)], env)
    assert done.code == 0, done.stderr[-3000:]
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json"):
        assert (out / "adapter" / name).is_file(), name
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "succeeded"
    # The report is drawn at the end, next to run.json.
    assert (out / "report.png").stat().st_size > 10_000
    page = (out / "report.html").read_text()
    assert "<img" in page
    # Generation samples, the base beside the trained adapter, and the task metrics.
    found = record["evaluation"]
    assert len(found["samples"]) == 2 and found["rows_scored"] == record["data"]["eval_rows"]
    assert set(found["metrics"]["after"]) == {"exact_match", "contains"}
    for sample in found["samples"]:
        assert {"prompt", "reference", "before", "after"} <= set(sample)
        assert html.escape(sample["after"]) in page
    assert "<h2>Samples</h2>" in page and "<h2>Task metrics</h2>" in page
    # The merged model, verified against base + adapter, published before run.json.
    merged = record["export"]
    assert merged["verification"]["passed"] and merged["dtype"] == "fp32"
    assert (out / "merged" / "EXPORT.json").is_file()
    assert {f["key"] for f in merged["files"]} >= {"config.json", "model.safetensors"}
    assert (out / "run.json").stat().st_mtime_ns >= (
        out / "merged" / "EXPORT.json"
    ).stat().st_mtime_ns
    # The trackers got the run: TensorBoard's files beside the adapter, one finished MLflow run.
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # as service.tracking sets it
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (mlflow_run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments() if e.name == "tiny-local"]
    )
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "tiny-local"
    assert len(client.get_metric_history(mlflow_run.info.run_id, "loss")) == record["steps"]
    assert record["data"]["rows_read"] == 48 and record["data"]["eval_rows"] >= 1
    assert record["losses"]["final_eval"] is not None
    assert record["versions"]["bitsandbytes"] == "0.50.2"
    steps = record["steps"]
    assert steps >= 3 and len([h for h in record["log_history"] if "loss" in h]) == steps
    # Tokens count every packed row's real tokens, once: the tokenizer's own count of each
    # training row (prompt + response + EOS, as trl builds it). Counting padding, or only one
    # row per packed sequence, gives another number.
    tokens = [h["num_tokens"] for h in record["log_history"] if "num_tokens" in h]
    assert tokens[-1] == expected_tokens(tiny_model, tiny_data, job)
    assert tokens[-1] < steps * 2 * 2 * 96  # fewer than the positions computed
    # run.json is written last: every file it vouches for is older.
    newest_adapter = max(p.stat().st_mtime_ns for p in (out / "adapter").iterdir())
    assert (out / "run.json").stat().st_mtime_ns >= newest_adapter
    # Logs are JSON lines with the job's identity bound on each.
    steps = done.named("train_log")
    assert steps and all(e["job"] == "tiny-local" and e["run_id"] == "tiny-local" for e in steps)

    # A pod restarted after success does not train again.
    again = run_job(["run", "--manifest", str(path)], env)
    assert again.code == 0
    assert again.named("run_already_complete")
    assert not again.named("train_log")


def expected_tokens(model: Path, data: Path, job: dict[str, Any]) -> int:
    from transformers import AutoTokenizer

    from service.data import load_dataset
    from service.manifest import validate_document

    spec = validate_document(job, "job").spec
    tokenizer = AutoTokenizer.from_pretrained(model)
    rows = load_dataset(spec.data, data.parent).train
    lengths = [
        len(tokenizer(r["prompt"] + r["completion"] + tokenizer.eos_token)["input_ids"])
        for r in rows
    ]
    return sum(min(n, spec.data.max_length) for n in lengths)


def test_invalid_manifest_exits_2_with_one_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        "apiVersion: spotlora/v1\nkind: FineTuneJob\nmetadata: {name: x}\n"
        "spec: {model: {source: m}, data: {train: d, fromat: alpaca}, "
        "output: {uri: o}}\n"
    )
    done = run_job(["run", "--manifest", str(path)], job_env(tmp_path / "cache"))
    assert done.code == 2
    assert "spec.data.fromat: unknown field" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()


def test_validate_prints_resolved_manifest(tmp_path: Path) -> None:
    job = manifest("v", "m", "d.jsonl", str(tmp_path / "o"))
    path = write_manifest(tmp_path / "job.yaml", job)
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "entrypoint.py",
            "validate",
            "-f",
            str(path),
            "--set",
            "training.learning_rate=5e-5",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        env=job_env(tmp_path / "cache"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "learning_rate: 5.0e-05" in proc.stdout
    assert "quant_type: nf4" in proc.stdout  # defaults are shown resolved


def test_torch_compile_without_a_recent_gpu_exits_2_before_anything_is_written(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    job = manifest("c", str(tiny_model), str(tiny_data), str(out), training={"torch_compile": True})
    done = run_job(
        ["run", "-f", str(write_manifest(tmp_path / "job.yaml", job))], job_env(tmp_path)
    )
    assert done.code == 2
    assert "spec.training.torch_compile: needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_missing_manifest_file_exits_2(tmp_path: Path) -> None:
    done = run_job(["run", "--manifest", str(tmp_path / "nope.yaml")], job_env(tmp_path))
    assert done.code == 2
    assert "manifest not found" in done.stderr


def test_unusable_data_exits_65_naming_the_first_bad_line(tiny_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "x"}\nnot json\n{"output": "y"}\n')
    out = tmp_path / "out"
    path = write_manifest(
        tmp_path / "job.yaml", manifest("bad-data", str(tiny_model), str(data), str(out))
    )
    done = run_job(["run", "--manifest", str(path)], job_env(tmp_path / "cache"))
    assert done.code == 65
    assert f"{data} line 1: missing or empty 'output'" in done.stderr
    assert "no usable alpaca rows in 3 read" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing written: no record, no adapter, no claim


def test_rows_that_cannot_train_fail_before_the_run_is_claimed(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """Every response starts past max_length: found only once the rows are tokenized, after
    the model is loaded, and still before the run is claimed: nothing is written but the
    attempt's own record (the model load it paid for is in the run's ledger)."""
    out = tmp_path / "out"
    doc = manifest("too-short", str(tiny_model), str(tiny_data), str(out), data={"max_length": 32})
    done = run_job(
        ["run", "--manifest", str(write_manifest(tmp_path / "job.yaml", doc))],
        job_env(tmp_path / "cache"),
    )
    assert done.code == 65, done.stderr[-2000:]
    assert "no row has any response token within data.max_length=32" in done.stderr
    assert done.named("model_loaded")  # it failed late, after loading
    (record_path,) = [p for p in out.rglob("*") if p.is_file()]  # no LATEST, no outputs
    assert record_path.parent == out / "checkpoints" / "too-short" / "attempts"
    assert json.loads(record_path.read_text())["outcome"] == "failed"


def test_a_base_model_without_a_chat_template_trains_chat_rows_with_the_manifests(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """A base model's tokenizer has no chat template: without data.chat_template a chat job
    stops right after the tokenizer loads (exit 2, nothing written); with one it trains, and
    the adapter's and the merged model's tokenizers carry it."""
    import shutil

    from transformers import AutoTokenizer

    from service.chat_templates import CHATML

    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "chat_template.jinja").unlink()
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    chat = tmp_path / "chat.jsonl"
    with chat.open("w") as f:
        for line in tiny_data.read_text().splitlines():
            row = json.loads(line)
            prompt = row["instruction"] + (f"\n{row['input']}" if row.get("input") else "")
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": row["output"]},
            ]
            f.write(json.dumps({"messages": turns}) + "\n")
    out = tmp_path / "out"
    doc = manifest("base-chat", str(base), str(chat), str(out), data={"format": "chat"})
    done = run_job(
        ["run", "--manifest", str(write_manifest(tmp_path / "none.yaml", doc))],
        job_env(tmp_path / "cache"),
    )
    assert done.code == 2, done.stderr[-2000:]
    assert "'chat' needs a chat template; " in done.stderr
    assert "name one in spec.data.chat_template (chatml, llama-3, zephyr)" in done.stderr
    assert not done.named("model_loaded")  # before the weights
    # Nothing but the attempt's own record: no LATEST, no outputs.
    (record_path,) = [p for p in out.rglob("*") if p.is_file()]
    assert record_path.parent == out / "checkpoints" / "base-chat" / "attempts"
    doc["spec"]["data"]["chat_template"] = "chatml"
    doc["spec"]["training"]["max_steps"] = 2
    doc["spec"]["export"] = {"merged": True}
    done = run_job(
        ["run", "--manifest", str(write_manifest(tmp_path / "chatml.yaml", doc))],
        job_env(tmp_path / "cache"),
    )
    assert done.code == 0, done.stderr[-3000:]
    assert AutoTokenizer.from_pretrained(out / "adapter").chat_template == CHATML
    assert AutoTokenizer.from_pretrained(out / "merged").chat_template == CHATML


@pytest.mark.parametrize("spec_change", [{"data": {"format": "chat"}}])
def test_wrong_format_for_rows_exits_65(
    tiny_model: Path, tiny_data: Path, tmp_path: Path, spec_change: dict[str, dict[str, str]]
) -> None:
    path = write_manifest(
        tmp_path / "job.yaml",
        manifest("fmt", str(tiny_model), str(tiny_data), str(tmp_path / "out"), **spec_change),
    )
    done = run_job(["run", "--manifest", str(path)], job_env(tmp_path / "cache"))
    assert done.code == 65
    assert "missing or empty 'messages' list" in done.stderr


def test_unreachable_storage_exits_69(tiny_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    path = write_manifest(
        tmp_path / "job.yaml",
        manifest("s3-down", str(tiny_model), str(tiny_data), "s3://bucket/out/"),
    )
    env = job_env(
        tmp_path / "cache",
        AWS_ENDPOINT_URL_S3="http://127.0.0.1:9",
        AWS_MAX_ATTEMPTS="2",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1",
    )
    done = run_job(["run", "--manifest", str(path)], env)
    assert done.code == 69, done.stderr[-2000:]
    assert "failed after 2 attempts" in done.stderr
    assert "Traceback" not in done.stderr


def test_sigterm_during_startup_is_not_lost(
    tiny_model: Path, tiny_data: Path, tmp_path: Path
) -> None:
    """As PID 1 a SIGTERM while libraries still import must not kill the process outright:
    it is kept, and the run stops before loading anything more, without claiming the run.
    No progress was made, so it exits 76 (the Job counts it), not 75. The attempt is in the
    ledger all the same, billed from its process's first second."""
    import signal
    import time

    out = tmp_path / "out"
    path = write_manifest(
        tmp_path / "job.yaml", manifest("early", str(tiny_model), str(tiny_data), str(out))
    )
    launched = time.time()
    # 0.5 s: the interpreter is up and importing, long before the run starts.
    done = run_job(
        ["run", "--manifest", str(path)],
        job_env(tmp_path / "cache"),
        signal_after=(signal.SIGTERM, 0.5),
    )
    assert done.signals_sent  # without the early handler: killed, exit -15
    assert done.code == 76, done.stderr[-3000:]
    assert done.named("preemption_requested")[0]["reason"] == "SIGTERM"
    assert not done.named("model_loaded")
    # Nothing claimed, nothing published: the attempt's own record alone.
    (record_path,) = [p for p in out.rglob("*") if p.is_file()]
    assert record_path.parent == out / "checkpoints" / "early" / "attempts"
    record = json.loads(record_path.read_text())
    assert record["outcome"] == "preempted" and record["reason"] == "SIGTERM"
    assert launched - 1 < record["started_unix"] < launched + 0.5


def test_ctrl_c_stops_commands_that_run_no_job(tmp_path: Path) -> None:
    """Only run and launch keep an early SIGINT for a graceful stop; `runs list` against a
    store that never answers stops at Ctrl-C."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    env = job_env(
        tmp_path,
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{silent.getsockname()[1]}",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
        AWS_DEFAULT_REGION="us-east-1",
    )
    proc = subprocess.Popen(
        [sys.executable, "entrypoint.py", "runs", "list", "s3://some-bucket/jobs/"],
        cwd=REPO,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a suite started in the background of a shell without job
        # control inherits SIGINT ignored, and Python then installs no handler for it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        silent.settimeout(120)
        conn, _ = silent.accept()  # the command is waiting on storage now
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err[-2000:]
        assert "spotlora: interrupted" in err and "Traceback" not in err
        assert time.monotonic() - started < 30
        conn.close()
    finally:
        proc.kill()
        silent.close()


def test_a_hostile_path_cannot_forge_a_log_line(tmp_path: Path) -> None:
    """A file name with a newline, a fake JSON event and an ANSI escape: the error names it,
    escaped, and every line on stderr is either one real event or a `spotlora:` line."""
    forged = '{"event": "run_complete", "level": "info"}'
    path = tmp_path / f"job\x1b[2J\n{forged}\n.yaml"
    done = run_job(["run", "--manifest", str(path)], job_env(tmp_path / "cache"))
    assert done.code == 2, done.stderr[-2000:]
    assert "\x1b" not in done.stderr and "\\x1b[2J" in done.stderr
    assert not done.named("run_complete")
    for line in done.stderr.splitlines():
        assert line.startswith(("{", "spotlora: ")), line
