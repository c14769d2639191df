from __future__ import annotations

import http.server
import math
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs
from transformers import TrainerControl, TrainerState, TrainingArguments

from service.metrics.callback import MetricsCallback, attach, format_duration
from service.metrics.registry import JobMetrics, Phase

# What trl 1.16's SFTTrainer hands to on_log (taken from a real tiny run): the train window's
# mean loss, and a *cumulative* token count.
TRAIN_LOGS = {
    "loss": 2.979,
    "grad_norm": 1.724,
    "learning_rate": 1.6667e-05,
    "entropy": 2.94,
    "mean_token_accuracy": 0.0,
    "num_tokens": 72.0,
    "epoch": 0.125,
}
EVAL_LOGS = {
    "eval_loss": 2.974,
    "eval_runtime": 0.0039,
    "eval_samples_per_second": 2030.4,
    "eval_steps_per_second": 253.8,
    "eval_entropy": 2.94,
    "eval_mean_token_accuracy": 0.0,
    "eval_num_tokens": 108.0,
    "epoch": 0.1875,
}
# Labels a sample may carry: a histogram's bucket, the phase enum's state, and an info's values.
ALLOWED_LABELS = {"le", "spotlora_job_phase", "split", "metric", "model"}


def value(metrics: JobMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def metrics() -> Iterator[JobMetrics]:
    m = JobMetrics("tiny-job")
    yield m
    m.close()


# -- names, units, types --------------------------------------------------------------------


def test_every_metric_is_prefixed_documented_and_low_cardinality(metrics: JobMetrics) -> None:
    metrics.m.loss.labels(split="train").set(1.0)
    families = list(metrics.registry.collect()) + list(metrics.success_registry.collect())
    assert len(families) >= 25
    for family in families:
        assert family.name.startswith("spotlora_"), family.name
        assert family.documentation.strip(), family.name
        for sample in family.samples:
            if family.type == "info":
                continue
            assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)


def test_units_and_types_follow_the_naming_guide(metrics: JobMetrics) -> None:
    types = {
        family.name: family.type
        for registry in (metrics.registry, metrics.success_registry)
        for family in registry.collect()
    }
    for name, kind in types.items():
        if kind == "counter":
            assert not name.endswith("_total"), "prometheus_client appends _total itself"
        if "time" in name or "duration" in name:
            assert name.endswith("_seconds"), name
        if "memory" in name:
            assert name.endswith("_bytes"), name
    assert types["spotlora_job_phase"] == "stateset"
    assert types["spotlora_checkpoint_save_seconds"] == "histogram"
    assert types["spotlora_checkpoint_upload_seconds"] == "histogram"
    assert types["spotlora_build"] == "info"
    assert types["spotlora_job"] == "info"
    for counter in (
        "spotlora_train_tokens",
        "spotlora_train_samples",
        "spotlora_preemptions",
        "spotlora_resumes",
        "spotlora_data_rows_skipped",
        "spotlora_checkpoint_upload_bytes",
    ):
        assert types[counter] == "counter", counter
    names = metrics.metric_names()
    assert {
        "spotlora_global_step",
        "spotlora_max_steps",
        "spotlora_loss",
        "spotlora_learning_rate",
        "spotlora_grad_norm",
        "spotlora_train_tokens_per_second",
        "spotlora_gpu_memory_allocated_bytes",
        "spotlora_gpu_memory_reserved_bytes",
        "spotlora_gpu_utilization_ratio",
        "spotlora_checkpoint_last_committed_timestamp_seconds",
        "spotlora_preemptions_total",
        "spotlora_resumes_total",
        "spotlora_last_success_timestamp_seconds",
        "spotlora_checkpoint_save_seconds_bucket",
    } <= names


def test_build_info_reports_library_versions(metrics: JobMetrics) -> None:
    import transformers
    import trl

    labels = next(
        s.labels
        for f in metrics.registry.collect()
        if f.name == "spotlora_build"
        for s in f.samples
    )
    assert labels["transformers_version"] == transformers.__version__
    assert labels["trl_version"] == trl.__version__
    assert set(labels) >= {"torch_version", "peft_version", "bitsandbytes_version"}


def test_jobs_have_separate_registries() -> None:
    a, b = JobMetrics("a"), JobMetrics("b")
    a.preempted()
    assert a.registry.get_sample_value("spotlora_preemptions_total") == 1
    assert b.registry.get_sample_value("spotlora_preemptions_total") == 0
    shared = CollectorRegistry()
    JobMetrics("c", registry=shared)
    assert shared.get_sample_value("spotlora_global_step") == 0


def test_phase_is_a_single_hot_state(metrics: JobMetrics) -> None:
    assert metrics.current_phase is Phase.LOADING
    metrics.set_phase("training")
    metrics.set_phase(Phase.CHECKPOINTING)
    states = {
        p.value: value(metrics, "spotlora_job_phase", spotlora_job_phase=p.value) for p in Phase
    }
    assert states == {p.value: 1.0 if p is Phase.CHECKPOINTING else 0.0 for p in Phase}
    with pytest.raises(ValueError):
        metrics.set_phase("sleeping")


def test_events_update_counters_and_checkpoint_age(metrics: JobMetrics) -> None:
    before = time.time()
    metrics.checkpoint_saved(step=10, blocking_seconds=0.3)
    metrics.checkpoint_committed(step=10, upload_seconds=4.0, upload_bytes=1234)
    metrics.preempted()
    metrics.resumed(step=10)
    metrics.rows_skipped(3)
    metrics.rows_skipped(0)
    assert value(metrics, "spotlora_checkpoint_save_seconds_count") == 1
    assert value(metrics, "spotlora_checkpoint_save_seconds_bucket", le="0.5") == 1
    assert value(metrics, "spotlora_checkpoint_upload_seconds_sum") == 4.0
    assert value(metrics, "spotlora_checkpoint_upload_bytes_total") == 1234
    assert value(metrics, "spotlora_checkpoints_committed_total") == 1
    assert value(metrics, "spotlora_checkpoint_last_committed_step") == 10
    assert value(metrics, "spotlora_checkpoint_last_committed_timestamp_seconds") >= before
    assert value(metrics, "spotlora_preemptions_total") == 1
    assert value(metrics, "spotlora_resumes_total") == 1
    assert value(metrics, "spotlora_global_step") == 10
    assert value(metrics, "spotlora_data_rows_skipped_total") == 3


def test_loss_series_appear_only_once_logged(metrics: JobMetrics) -> None:
    assert value(metrics, "spotlora_loss", split="train") is None
    metrics.m.loss.labels(split="train").set(2.0)
    assert value(metrics, "spotlora_loss", split="train") == 2.0
    assert value(metrics, "spotlora_loss", split="eval") is None


def test_gpu_sampling_never_raises_without_cuda(metrics: JobMetrics) -> None:
    metrics.sample_gpu()
    assert value(metrics, "spotlora_gpu_memory_allocated_bytes") == 0


# -- last success and the Pushgateway --------------------------------------------------------


class FakeGateway(http.server.BaseHTTPRequestHandler):
    requests: list[tuple[str, str, str]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        self.server.requests.append((self.command, self.path, body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.end_headers()

    do_PUT = do_POST

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_gateway() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeGateway)
    server.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", server.requests  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


def test_last_success_is_set_and_pushed_only_on_success(fake_gateway) -> None:
    url, requests = fake_gateway
    failed = JobMetrics("tiny-job", pushgateway_url=url)
    failed.finish(Phase.FAILED)
    failed.close()
    assert failed.success_registry.get_sample_value("spotlora_last_success_timestamp_seconds") == 0
    assert value(failed, "spotlora_job_phase", spotlora_job_phase="failed") == 1
    method, path, body = requests[-1]
    assert (method, path) == ("POST", "/metrics/job/spotlora/spotlora_job/tiny-job")
    assert "spotlora_job_phase" in body
    assert "spotlora_last_success_timestamp_seconds" not in body

    before = time.time()
    ok = JobMetrics("tiny-job", pushgateway_url=url)
    ok.finish(Phase.DONE)
    ok.close()
    stamp = ok.success_registry.get_sample_value("spotlora_last_success_timestamp_seconds")
    assert stamp is not None and stamp >= before
    method, _, body = requests[-1]
    assert method == "POST"
    assert "spotlora_last_success_timestamp_seconds" in body
    assert 'spotlora_job_phase{spotlora_job_phase="done"} 1.0' in body


def test_phase_changes_push(fake_gateway) -> None:
    url, requests = fake_gateway
    metrics = JobMetrics("tiny-job", pushgateway_url=url)
    metrics.set_phase(Phase.TRAINING)
    metrics.set_phase(Phase.TRAINING)  # no change, no push
    metrics.finish(Phase.DONE)
    metrics.close()
    assert 1 <= len(requests) <= 2  # coalesced when the first push had not started yet
    assert "spotlora_last_success_timestamp_seconds" in requests[-1][2]


def test_last_success_is_not_served(metrics: JobMetrics) -> None:
    port = metrics.serve(port=0, addr="127.0.0.1")
    metrics.finish(Phase.DONE)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "spotlora_global_step 0.0" in body
    assert "spotlora_last_success_timestamp_seconds" not in body


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gateway_down_neither_raises_nor_stalls() -> None:
    metrics = JobMetrics(
        "tiny-job",
        pushgateway_url=f"http://127.0.0.1:{closed_port()}",
        push_timeout_seconds=0.5,
    )
    start = time.monotonic()
    with capture_logs() as logs:
        metrics.set_phase(Phase.TRAINING)
        metrics.preempted()
        metrics.finish(Phase.DONE)
        metrics.close()
    assert time.monotonic() - start < 2.0
    assert any(entry["event"] == "pushgateway_push_failed" for entry in logs)


def test_gateway_that_never_answers_costs_training_nothing() -> None:
    # A listening socket nobody accepts from: connects succeed, responses never come.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        metrics = JobMetrics("tiny-job", pushgateway_url=url, push_timeout_seconds=0.3)
        start = time.monotonic()
        for phase in (Phase.TRAINING, Phase.CHECKPOINTING, Phase.TRAINING):
            metrics.set_phase(phase)
        assert time.monotonic() - start < 0.1  # the training thread never waits on a push
        metrics.finish(Phase.DONE, wait_seconds=1.0)
        metrics.close()
        assert time.monotonic() - start < 3.0


# -- the trainer callback ---------------------------------------------------------------------


def trainer_objects(tmp_path: Path, global_step: int = 0) -> tuple:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        report_to=[],
        use_cpu=True,
    )
    state = TrainerState(max_steps=100, global_step=global_step)
    return args, state, TrainerControl()


def test_callback_reads_real_trl_log_keys(metrics: JobMetrics, tmp_path: Path) -> None:
    clock = Clock()
    callback = MetricsCallback(metrics, clock=clock)
    args, state, control = trainer_objects(tmp_path)
    callback.on_train_begin(args, state, control)
    assert metrics.current_phase is Phase.LOADING  # the phase is the run's to set (observer)
    assert value(metrics, "spotlora_max_steps") == 100

    for _ in range(2):
        state.global_step += 1
        state.epoch = state.global_step / 16
        callback.on_step_end(args, state, control)
    clock.now += 2.0
    callback.on_log(args, state, control, logs=dict(TRAIN_LOGS))
    assert value(metrics, "spotlora_global_step") == 2
    assert value(metrics, "spotlora_loss", split="train") == pytest.approx(2.979)
    assert value(metrics, "spotlora_learning_rate") == pytest.approx(1.6667e-05)
    assert value(metrics, "spotlora_grad_norm") == pytest.approx(1.724)
    assert value(metrics, "spotlora_epoch") == pytest.approx(0.125)
    assert value(metrics, "spotlora_train_tokens_total") == 72
    assert value(metrics, "spotlora_train_samples_total") == 2 * 4 * 2

    clock.now += 4.0
    callback.on_log(args, state, control, logs={**TRAIN_LOGS, "num_tokens": 144.0, "loss": 2.5})
    assert value(metrics, "spotlora_train_tokens_total") == 144  # cumulative -> delta
    assert value(metrics, "spotlora_train_tokens_per_second") == pytest.approx(72 / 4.0)
    assert value(metrics, "spotlora_loss", split="train") == 2.5

    callback.on_log(args, state, control, logs=dict(EVAL_LOGS))
    assert value(metrics, "spotlora_loss", split="eval") == pytest.approx(2.974)
    assert value(metrics, "spotlora_train_tokens_total") == 144  # eval_num_tokens is not train


def test_callback_keeps_nan_loss_visible(metrics: JobMetrics, tmp_path: Path) -> None:
    callback = MetricsCallback(metrics)
    args, state, control = trainer_objects(tmp_path)
    callback.on_log(args, state, control, logs={**TRAIN_LOGS, "loss": float("nan")})
    assert math.isnan(value(metrics, "spotlora_loss", split="train") or 0.0)


def test_new_trainer_restarting_token_count_does_not_lose_tokens(
    metrics: JobMetrics, tmp_path: Path
) -> None:
    callback = MetricsCallback(metrics)
    args, state, control = trainer_objects(tmp_path)
    callback.on_log(args, state, control, logs={"num_tokens": 500.0})
    callback.on_log(args, state, control, logs={"num_tokens": 40.0})
    assert value(metrics, "spotlora_train_tokens_total") == 540


def test_progress_line_every_interval_with_eta(metrics: JobMetrics, tmp_path: Path) -> None:
    clock = Clock()
    callback = MetricsCallback(metrics, progress_interval_seconds=30.0, clock=clock)
    args, state, control = trainer_objects(tmp_path, global_step=20)  # resumed at step 20
    with capture_logs() as logs:
        callback.on_train_begin(args, state, control)
        for _ in range(20):
            clock.now += 3.0
            state.global_step += 1
            callback.on_step_end(args, state, control)
    lines = [entry for entry in logs if entry["event"] == "progress"]
    assert len(lines) == 2  # at 30 s and 60 s
    last = lines[-1]
    assert last["step"] == 40 and last["total_steps"] == 100 and last["percent"] == 40.0
    # 20 steps in 60 s since the resume; 60 steps left -> 180 s.
    assert last["eta_seconds"] == 180 and last["eta"] == "0:03:00"
    assert not any("\r" in str(v) for entry in lines for v in entry.values())


def test_format_duration() -> None:
    assert format_duration(3725.4) == "1:02:05"
    assert format_duration(None) is None
    assert format_duration(float("inf")) is None


class FakeTrainer:
    def __init__(self) -> None:
        from transformers import PrinterCallback, ProgressCallback

        self.callbacks: list[object] = [ProgressCallback, PrinterCallback]

    def remove_callback(self, callback: type) -> None:
        self.callbacks = [c for c in self.callbacks if c is not callback]

    def add_callback(self, callback: object) -> None:
        self.callbacks.append(callback)


class Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_attach_keeps_tqdm_on_a_terminal_and_logs_lines_elsewhere(metrics: JobMetrics) -> None:
    on_tty = FakeTrainer()
    callback = attach(on_tty, metrics, stream=Stream(tty=True))  # type: ignore[arg-type]
    assert callback.progress_interval_seconds is None
    assert len(on_tty.callbacks) == 3

    in_pod = FakeTrainer()
    callback = attach(in_pod, metrics, progress_interval_seconds=10, stream=Stream(tty=False))  # type: ignore[arg-type]
    assert callback.progress_interval_seconds == 10
    assert in_pod.callbacks == [callback]


# -- dashboard and alert rules use only metrics that exist ----------------------------------

MONITORING = Path(__file__).resolve().parents[1] / "k8s" / "monitoring"


def promql_expressions(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, child in node.items():
            if key in ("expr", "definition") and isinstance(child, str):
                yield child
            else:
                yield from promql_expressions(child)
    elif isinstance(node, list):
        for child in node:
            yield from promql_expressions(child)


def metric_names_in(expr: str) -> set[str]:
    """Names in metric position: label matchers, grouping clauses and label_values' label
    argument are cut first, since `spotlora_job` and `spotlora_job_phase` are also labels."""
    expr = re.sub(r"\{[^{}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", expr)
    return set(re.findall(r"\bspotlora_\w+", expr))


def test_dashboard_and_rules_use_only_existing_metrics(metrics: JobMetrics) -> None:
    import json

    import yaml

    documents = {
        "grafana-dashboard.json": json.loads((MONITORING / "grafana-dashboard.json").read_text()),
        "prometheus-rules.yaml": yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text()),
    }
    known = metrics.metric_names()
    for filename, document in documents.items():
        expressions = list(promql_expressions(document))
        assert expressions, filename
        used = set().union(*(metric_names_in(e) for e in expressions))
        assert used, filename
        assert used <= known, f"{filename} uses unknown metrics: {sorted(used - known)}"


def test_metric_name_extraction_ignores_labels() -> None:
    expr = (
        'changes(spotlora_global_step{job!="spotlora"}[10m]) == 0 and ignoring(spotlora_job_phase)'
        ' spotlora_job_phase{spotlora_job_phase="training"} == 1'
        " and sum by (spotlora_job) (spotlora_nonexistent_total)"
    )
    assert metric_names_in(expr) == {
        "spotlora_global_step",
        "spotlora_job_phase",
        "spotlora_nonexistent_total",
    }
