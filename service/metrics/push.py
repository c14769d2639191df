"""Pushes to a Prometheus Pushgateway, from a thread of their own."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, pushadd_to_gateway
from prometheus_client.exposition import basic_auth_handler, default_handler
from prometheus_client.registry import Collector

from service.uris import without_userinfo

log = structlog.get_logger(__name__)

# The `job` half of the Pushgateway grouping key. The other half is `spotlora_job=<job name>`:
# a Job name is bounded (one group per FineTuneJob, reused across its pod restarts), whereas a
# run id or pod name would leave one group behind per attempt, forever, on the gateway.
PUSHGATEWAY_JOB = "spotlora"


class _CombinedCollector(Collector):
    def __init__(self, registries: Iterable[CollectorRegistry]) -> None:
        self._registries = tuple(registries)

    def collect(self) -> Iterable[Any]:
        for registry in self._registries:
            yield from registry.collect()


class Pusher:
    """Pushes from a daemon thread, so a down or slow gateway never stalls training.

    Requests coalesce: metric values are read when the push happens, so ten requests made while
    one push hangs become a single push of the latest values. The thread is a daemon, so even a
    push stuck in DNS cannot keep the process from exiting.

    Basic auth goes through prometheus_client's own handler; credentials never come in the URL
    (urllib would take ``user:password@host`` for a host name), and the URL is logged without
    any, should a caller pass one anyway.
    """

    def __init__(
        self,
        url: str,
        job_name: str,
        registry: CollectorRegistry,
        success_registry: CollectorRegistry,
        timeout_seconds: float,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("Pushgateway basic auth needs both a username and a password")
        self.url = url
        self._handler = default_handler if username is None else _basic_auth(username, password)
        self.grouping_key = {"spotlora_job": job_name}
        self.timeout_seconds = timeout_seconds
        self._registry = registry
        self._with_success = CollectorRegistry(auto_describe=False)
        self._with_success.register(_CombinedCollector((registry, success_registry)))
        self._cond = threading.Condition()
        self._requested = 0
        self._completed = 0
        self._include_success = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="spotlora-push", daemon=True)
        self._thread.start()

    def request(self, include_success: bool = False) -> int:
        with self._cond:
            self._requested += 1
            self._include_success = self._include_success or include_success
            self._cond.notify_all()
            return self._requested

    def wait(self, generation: int, timeout_seconds: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._completed >= generation, timeout_seconds)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._requested > self._completed)
                if self._requested == self._completed:
                    return
                generation = self._requested
                include_success = self._include_success
            self._push(include_success)
            with self._cond:
                self._completed = generation
                self._cond.notify_all()

    def _push(self, include_success: bool) -> None:
        # POST (pushadd), not PUT: it replaces only the metric names sent, so a push without
        # the success gauge leaves the gateway's last success in place.
        try:
            pushadd_to_gateway(
                self.url,
                job=PUSHGATEWAY_JOB,
                registry=self._with_success if include_success else self._registry,
                grouping_key=self.grouping_key,
                timeout=self.timeout_seconds,
                handler=self._handler,
            )
        except Exception as exc:  # a monitoring outage must never fail the job
            log.warning("pushgateway_push_failed", url=without_userinfo(self.url), error=str(exc))


def _basic_auth(username: str | None, password: str | None) -> Callable[..., Callable[[], None]]:
    """prometheus_client's basic-auth handler with the credentials bound, held only here."""

    def handler(
        url: str, method: str, timeout: float | None, headers: list[Any], data: bytes
    ) -> Callable[[], None]:
        return basic_auth_handler(url, method, timeout, headers, data, username, password)

    return handler
