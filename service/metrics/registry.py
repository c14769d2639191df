"""Every metric spotlora exposes, and the three ways they leave the process.

1. Scraped: `JobMetrics.serve()` exposes `/metrics` for the whole run (port 9090 by contract).
2. Pushed: with a Pushgateway URL, the metrics are pushed on each phase change, checkpoint,
   preemption and at the end, so a Job that is gone still shows how it ended.
3. Logged: off a terminal, `attach()` replaces transformers' tqdm bar with a progress line every
   N seconds (a bar full of carriage returns is unreadable in `kubectl logs`).

Names follow the Prometheus naming guide: a `spotlora_` prefix, base units (`_seconds`,
`_bytes`, ratios in 0..1), `_total` on counters. There are no per-job labels on the metrics
themselves: a scrape gets the Job's identity from target labels (see
k8s/components/podmonitor/podmonitor.yaml), a push from the grouping key. Never add a step, run
id or pod as a label: each value would become a new series.

Every metric lives on a per-job `CollectorRegistry`, not the process-global one, so a test (or a
process that runs two jobs) can hold several at once.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    start_http_server,
)

from service.metrics.instruments import Instruments
from service.metrics.phase import Phase
from service.metrics.push import Pusher
from service.versions import package_version

log = structlog.get_logger(__name__)

DEFAULT_PORT = 9090
PUSH_TIMEOUT_SECONDS = 5.0


# Distribution names reported in spotlora_build_info.
BUILD_PACKAGES = ("spotlora", "torch", "transformers", "peft", "trl", "bitsandbytes")


class JobMetrics:
    """The metrics of one job, and the HTTP server and Pushgateway pushes that carry them."""

    def __init__(
        self,
        job_name: str,
        registry: CollectorRegistry | None = None,
        *,
        pushgateway_url: str | None = None,
        push_timeout_seconds: float = PUSH_TIMEOUT_SECONDS,
        pushgateway_username: str | None = None,
        pushgateway_password: str | None = None,
    ) -> None:
        self.job_name = job_name
        self.registry = registry if registry is not None else CollectorRegistry()
        # Only ever pushed together with `registry`, and only by finish(Phase.DONE): a push of
        # `registry` alone (a failed or preempted run) then leaves the gateway's previous value.
        self.success_registry = CollectorRegistry()
        self.m = Instruments(self.registry, self.success_registry)
        self.m.phase.state(Phase.LOADING.value)
        self.m.job_start_time.set(time.time())
        self.m.build_info.info(
            {f"{name}_version": package_version(name) for name in BUILD_PACKAGES}
        )
        # None until the run sets its first phase, which is always pushed: a new pod's
        # "loading" replaces what the previous pod of the same job left on the gateway.
        self._current_phase: Phase | None = None
        self._lock = threading.Lock()
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._pusher = (
            Pusher(
                pushgateway_url,
                job_name,
                self.registry,
                self.success_registry,
                push_timeout_seconds,
                username=pushgateway_username,
                password=pushgateway_password,
            )
            if pushgateway_url
            else None
        )

    # -- exposition -----------------------------------------------------------------------

    def serve(self, port: int = DEFAULT_PORT, addr: str = "0.0.0.0") -> int:
        """Serve `/metrics` from a daemon thread until close(); returns the bound port.

        Port 0 picks a free port (tests). The success gauge is not served: the pod is gone by
        the time it would be scraped, and it must reach the gateway only on success.
        """
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        self._server, self._server_thread = start_http_server(port, addr, registry=self.registry)
        bound_port = int(self._server.server_port)
        log.info("metrics_serving", addr=addr, port=bound_port)
        return bound_port

    @property
    def port(self) -> int | None:
        return None if self._server is None else int(self._server.server_port)

    def push(self) -> None:
        """Ask for a push to the Pushgateway; returns at once (no-op without a gateway)."""
        if self._pusher is not None:
            self._pusher.request()

    # -- events from the run ----------------------------------------------------------------

    def set_phase(self, phase: Phase | str) -> None:
        phase = Phase(phase)
        with self._lock:
            changed = phase != self._current_phase
            self._current_phase = phase
        self.m.phase.state(phase.value)
        if changed:
            self.push()

    @property
    def current_phase(self) -> Phase:
        return self._current_phase or Phase.LOADING

    def set_info(self, *, model: str, manifest_sha256: str, **labels: str) -> None:
        """Describe the job: one series per job, so bounded values only (no run id)."""
        self.m.job_info.info({"model": model, "manifest_sha256": manifest_sha256, **labels})

    def checkpoint_saved(self, step: int, blocking_seconds: float) -> None:
        self.m.checkpoint_save.observe(blocking_seconds)
        log.debug("checkpoint_saved_metrics", step=step, blocking_seconds=blocking_seconds)

    def checkpoint_failed(self, step: int, error: str) -> None:
        self.m.checkpoint_failures.inc()
        self.push()

    def checkpoint_committed(self, step: int, upload_seconds: float, upload_bytes: int) -> None:
        self.m.checkpoint_upload.observe(upload_seconds)
        self.m.checkpoint_upload_bytes.inc(upload_bytes)
        self.m.checkpoints_committed.inc()
        self.m.last_checkpoint_step.set(step)
        self.m.last_checkpoint_time.set(time.time())
        self.push()

    def preempted(self) -> None:
        self.m.preemptions.inc()
        self.push()

    def resumed(self, step: int) -> None:
        self.m.resumes.inc()
        self.m.global_step.set(step)

    def skipped(self) -> None:
        self.m.runs_skipped.inc()

    def spent(self, dollars: float, run_total: float) -> None:
        self.m.cost.inc(max(dollars, 0.0))
        self.m.run_cost.set(run_total)

    def lost_work(self, seconds: float, dollars: float | None) -> None:
        self.m.lost_work_seconds.inc(max(seconds, 0.0))
        if dollars is not None:
            self.m.lost_work_cost.inc(max(dollars, 0.0))

    def run_ledger(self, attempts: int, total_usd: float | None, lost_usd: float | None) -> None:
        self.m.run_attempts.set(attempts)
        if total_usd is not None:
            self.m.run_cost.set(total_usd)
        if lost_usd is not None:
            self.m.run_lost_cost.set(lost_usd)

    def task_score(self, metric: str, side: str, value: float) -> None:
        self.m.task_score.labels(metric=metric, model=side).set(value)

    def rows_skipped(self, n: int) -> None:
        if n > 0:
            self.m.rows_skipped_total.inc(n)

    def fused_kernels(self, counts: dict[str, int], fallbacks: int) -> None:
        for kernel, count in counts.items():
            self.m.fused_kernels.labels(kernel=kernel).set(count)
        self.m.fused_kernel_fallbacks.set(fallbacks)

    def sample_gpu(self) -> None:
        """Refresh the GPU gauges; does nothing on a machine without CUDA, and never raises."""
        try:
            import torch

            if not torch.cuda.is_available():
                return
            self.m.gpu_memory_allocated.set(torch.cuda.memory_allocated())
            self.m.gpu_memory_reserved.set(torch.cuda.memory_reserved())
            self.m.gpu_memory_max_allocated.set(torch.cuda.max_memory_allocated())
            # torch.cuda.utilization() goes through NVML and raises without pynvml.
            if importlib.util.find_spec("pynvml") is not None:
                self.m.gpu_utilization.set(torch.cuda.utilization() / 100.0)
        except Exception as exc:  # telemetry must never stop training
            log.debug("gpu_sample_failed", error=str(exc))

    def finish(self, outcome: Phase | None, wait_seconds: float | None = None) -> None:
        """Record how the run ended (DONE, PREEMPTED or FAILED) and push it, waiting at most
        `wait_seconds` for the gateway. None pushes nothing: a process that lost its run to a
        newer pod must not overwrite that pod's state on the gateway.

        The last-success timestamp is set (and pushed) only on DONE; otherwise it is left out
        of the push, so the gateway keeps the previous success.
        """
        if outcome is None:
            return
        success = outcome is Phase.DONE
        if success:
            self.m.last_success.set(time.time())
        with self._lock:
            self._current_phase = outcome
        self.m.phase.state(outcome.value)
        if self._pusher is not None:
            generation = self._pusher.request(include_success=success)
            timeout = self._pusher.timeout_seconds * 2 if wait_seconds is None else wait_seconds
            if not self._pusher.wait(generation, timeout):
                log.warning("pushgateway_final_push_timed_out", timeout_seconds=timeout)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=5)
            self._server = None
            self._server_thread = None
        if self._pusher is not None:
            self._pusher.close()

    def __enter__(self) -> JobMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def metric_names(self) -> set[str]:
        """Every sample name these metrics can expose, suffixes (`_bucket`, `_total`) included.

        Derived from the families rather than the current samples, so a labelled metric with no
        series yet is still listed.
        """
        names: set[str] = set()
        for registry in (self.registry, self.success_registry):
            for family in registry.collect():
                suffixes = _SAMPLE_SUFFIXES.get(family.type, ("",))
                names.update(family.name + suffix for suffix in suffixes)
        return names


_SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
