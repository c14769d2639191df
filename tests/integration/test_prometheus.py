"""Real servers: Prometheus scrapes a training run's /metrics; the Pushgateway keeps the last
success through a failed run; promtool accepts the alert rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.metrics.callback import attach
from service.metrics.registry import JobMetrics, Phase

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "k8s" / "monitoring" / "prometheus-rules.yaml"
DASHBOARD = REPO / "k8s" / "monitoring" / "grafana-dashboard.json"
RULES_TEST = REPO / "k8s" / "monitoring" / "prometheus-rules.test.yaml"
QUERY_DEADLINE_SECONDS = 15.0
TRAIN_STEPS = 12


def http_get(url: str, timeout_seconds: float = 2.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_seconds) as response:
        return response.read().decode()


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    body = json.loads(http_get(url))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def wait_for(
    prometheus_url: str, promql: str, check: Callable[[float], bool] = lambda v: True
) -> float:
    """Poll an instant query until it has one sample that passes `check`, for a bounded time."""
    deadline = time.monotonic() + QUERY_DEADLINE_SECONDS
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = query(prometheus_url, promql)
        if len(result) == 1 and check(float(result[0]["value"][1])):
            return float(result[0]["value"][1])
        time.sleep(0.25)
    pytest.fail(f"{promql!r} never passed within {QUERY_DEADLINE_SECONDS}s; last: {result}")


def tiny_trainer(output_dir: Path, callbacks: list[Any]) -> Any:
    """A one-layer Llama and a word-level tokenizer: a real SFTTrainer, offline, in seconds."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "cats"]
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    rows = [{"text": " ".join(words[i % 6 : i % 6 + 6])} for i in range(64)]
    args = SFTConfig(
        output_dir=str(output_dir),
        max_steps=TRAIN_STEPS,
        per_device_train_batch_size=4,
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=6,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=16,
    )
    return SFTTrainer(
        model=LlamaForCausalLM(config),
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows[:8]),
        processing_class=tokenizer,
        callbacks=callbacks,
    )


class SlowSteps:
    """Makes each step last long enough for a 1 s scrape interval to see training progress."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self) -> Any:
        from transformers import TrainerCallback

        seconds = self.seconds

        class Sleep(TrainerCallback):
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                time.sleep(seconds)

        return Sleep()


def test_prometheus_scrapes_a_real_training_run(prometheus, tmp_path: Path) -> None:
    metrics = JobMetrics("it-scrape")
    port = metrics.serve(port=0, addr="127.0.0.1")
    try:
        prom = prometheus(f"127.0.0.1:{port}", spotlora_job="it-scrape")
        wait_for(prom, 'up{job="spotlora"}', lambda v: v == 1)

        trainer = tiny_trainer(tmp_path / "out", callbacks=[SlowSteps(0.25)()])
        callback = attach(trainer, metrics, progress_interval_seconds=1.0)
        metrics.set_info(model="tiny-llama", manifest_sha256="0" * 64)
        trainer.train()
        metrics.finish(Phase.DONE)

        # Real keys flowed through: trl's num_tokens, loss, eval_loss, learning rate.
        assert callback.progress_interval_seconds == 1.0  # pytest's stderr is no terminal
        history = trainer.state.log_history
        assert all("time" in entry for entry in history)
        assert {"loss", "num_tokens", "grad_norm", "learning_rate"} <= set(history[0])

        selector = '{spotlora_job="it-scrape"}'
        wait_for(prom, f"spotlora_global_step{selector}", lambda v: v == TRAIN_STEPS)
        assert wait_for(prom, f"spotlora_max_steps{selector}") == TRAIN_STEPS
        # Scraped while it trained, not only at the end.
        assert wait_for(prom, f"changes(spotlora_global_step{selector}[1m])") >= 1
        assert wait_for(prom, f"spotlora_train_tokens_total{selector}") > 0
        assert wait_for(prom, f"spotlora_train_samples_total{selector}") == TRAIN_STEPS * 4
        assert wait_for(prom, f"spotlora_train_tokens_per_second{selector}") > 0
        assert wait_for(prom, 'spotlora_loss{spotlora_job="it-scrape",split="train"}') > 0
        assert wait_for(prom, 'spotlora_loss{spotlora_job="it-scrape",split="eval"}') > 0
        assert wait_for(prom, f"spotlora_learning_rate{selector}") > 0
        wait_for(prom, 'spotlora_job_phase{spotlora_job_phase="done"}', lambda v: v == 1)
        wait_for(prom, 'spotlora_job_info{model="tiny-llama"}', lambda v: v == 1)
        wait_for(prom, 'spotlora_build_info{trl_version="1.16.0"}', lambda v: v == 1)
        check_dashboard_queries(prom)
    finally:
        metrics.close()


def check_dashboard_queries(prom: str) -> None:
    """Every dashboard query parses and runs against the real Prometheus; key panels have data."""
    dashboard = json.loads(DASHBOARD.read_text())
    results = {}
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$spotlora_job", ".+")
            results[panel["title"]] = query(prom, expr.replace("$__rate_interval", "1m"))
    assert results["Phase per job"][0]["value"][1] == "5"  # the value mapping's "done"
    assert float(results["Step progress"][0]["value"][1]) == 1.0
    assert results["Loss"]


def gateway_samples(gateway_url: str, job: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(http_get(f"{gateway_url}/metrics")):
        for sample in family.samples:
            if sample.labels.get("spotlora_job") != job:
                continue
            assert sample.labels.get("job") == "spotlora"
            extra = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k not in ("job", "instance")
            )
            samples[f"{sample.name}{{{extra}}}"] = sample.value
    return samples


def test_failed_run_leaves_the_last_success_on_the_gateway(pushgateway: str) -> None:
    job = "it-push"
    key = f"spotlora_last_success_timestamp_seconds{{spotlora_job={job}}}"
    done = f"spotlora_job_phase{{spotlora_job={job},spotlora_job_phase=done}}"
    failed = f"spotlora_job_phase{{spotlora_job={job},spotlora_job_phase=failed}}"

    before = time.time()
    with JobMetrics(job, pushgateway_url=pushgateway) as ok:
        ok.set_phase(Phase.TRAINING)
        ok.m.global_step.set(100)
        ok.finish(Phase.DONE)
    pushed = gateway_samples(pushgateway, job)
    stamp = pushed[key]
    assert before <= stamp <= time.time()
    assert pushed[done] == 1
    assert pushed[f"spotlora_global_step{{spotlora_job={job}}}"] == 100

    with JobMetrics(job, pushgateway_url=pushgateway) as crashed:
        crashed.set_phase(Phase.TRAINING)
        crashed.m.global_step.set(7)
        crashed.finish(Phase.FAILED)
    after_failure = gateway_samples(pushgateway, job)
    assert after_failure[key] == stamp
    assert after_failure[failed] == 1 and after_failure[done] == 0
    assert after_failure[f"spotlora_global_step{{spotlora_job={job}}}"] == 7


def test_gateway_stopped_mid_run_costs_training_nothing(pushgateway: str) -> None:
    url = pushgateway.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
    start = time.monotonic()
    with JobMetrics("it-down", pushgateway_url=url, push_timeout_seconds=0.5) as metrics:
        metrics.set_phase(Phase.TRAINING)
        metrics.finish(Phase.DONE)
    assert time.monotonic() - start < 2.0
    assert "it-down" not in http_get(f"{pushgateway}/metrics")


def rule_groups(tmp_path: Path) -> Path:
    """The PrometheusRule's spec is a plain rules file; promtool reads it from there."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    path = tmp_path / "spotlora.rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_promtool_accepts_the_rules(promtool: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(rule_groups(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_synthetic_series(promtool: str, tmp_path: Path) -> None:
    rule_groups(tmp_path)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    result = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
