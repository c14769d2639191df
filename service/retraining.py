"""Scheduled retraining's policy (output.per_run): skip a run whose data and settings have
not changed, start from the published adapter, and promote a new one only if it is no worse.

Every decision reads PUBLISHED once: the warm start and the promotion gate use the same
adapter, and publishing later is conditional on that version (service.publication), so a
run never replaces a publication it did not compare itself against.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from service.history import RunHistory, training_sha256
from service.manifest.spec import JobSpec
from service.storage import fetch_cached

log = structlog.get_logger(__name__)

ADAPTER_DIR = "adapter"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str


def decide(
    value: float | None,
    published_value: float | None,
    has_published: bool,
    tolerance: float,
    metric: str = "eval_loss",
) -> Decision:
    """Publish the first run; later ones only if no worse than the published adapter on the
    same eval data, within the tolerance. Eval loss: lower is better; a task metric: higher."""
    if not has_published:
        return Decision(True, "first run: nothing published yet")
    if value is None or published_value is None:
        return Decision(True, "no eval data to compare against: published without a gate")
    lower_is_better = metric == "eval_loss"
    ok = (
        value <= published_value + tolerance
        if lower_is_better
        else value >= published_value - tolerance
    )
    relation = ("<=" if ok else ">") if lower_is_better else (">=" if ok else "<")
    sign = "+" if lower_is_better else "-"
    reason = (
        f"{metric.replace('_', ' ')} {value:.4f} {relation} published {published_value:.4f} "
        f"{sign} tolerance {tolerance}"
    )
    return Decision(ok, reason if ok else f"{reason}: not promoted")


class RetrainingPolicy:
    def __init__(self, history: RunHistory, spec: JobSpec, work_dir: Path) -> None:
        self.history = history
        self.spec = spec
        self.work_dir = work_dir
        self.published: dict[str, Any] | None = None
        self.published_tag: str | None = None  # PUBLISHED's version as first read
        self._read = False

    def unchanged_since_last_success(self, data_fingerprint: str) -> str | None:
        """Why this run need not train (the reason recorded), or None."""
        if not self.spec.promotion.skip_if_unchanged:
            return None
        last = self.history.last_success()
        if (
            last is None
            or last["data_fingerprint"] != data_fingerprint
            or last["training_sha256"] != training_sha256(self.spec)
        ):
            return None
        return f"data and training settings unchanged since run {last['run_id']}"

    def published_adapter(self) -> Path | None:
        """The published adapter, local; PUBLISHED is read once per run and the adapter
        fetched once (a warm start and the promotion gate both need it)."""
        if not self._read:
            self.published, self.published_tag = self.history.published()
            self._read = True
        if self.published is None:
            return None
        run_id = self.published["run_id"]
        local = self.work_dir / "published" / run_id
        store = self.history.run_storage(run_id).child(ADAPTER_DIR)
        objects = store.list_objects()
        if not objects:
            log.warning("published_adapter_missing", run_id=run_id, uri=store.uri)
            return None
        fetch_cached(store, objects, local)
        return local

    def warm_start(self, peft_model: Any) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = self.published_adapter()
        if adapter is None:
            log.info("warm_start_skipped", reason="nothing published yet")
            return
        config = json.loads((adapter / "adapter_config.json").read_text())
        # The layers this run adapts, as peft resolved them ('auto' and 'all-linear' included).
        adapted = peft_model.peft_config["default"].target_modules
        if config.get("r") != self.spec.lora.r or sorted(
            config.get("target_modules") or []
        ) != sorted(adapted):
            log.warning("warm_start_skipped", reason="published adapter has another LoRA shape")
            return
        set_peft_model_state_dict(peft_model, load_file(adapter / "adapter_model.safetensors"))
        log.info("warm_started", adapter=str(adapter))

    def decide(self, value: float | None, measure: Callable[[Path], float] | None) -> Decision:
        """``value``: this run's promotion.metric; ``measure`` takes the same measure of an
        adapter on this run's eval data (None without any)."""
        promotion = self.spec.promotion
        adapter = self.published_adapter()
        published = measure(adapter) if adapter is not None and measure else None
        tolerance = (
            promotion.max_eval_loss_increase
            if promotion.metric == "eval_loss"
            else promotion.max_metric_decrease
        )
        decision = decide(value, published, adapter is not None, tolerance, promotion.metric)
        log.info(
            "promotion_decided",
            promoted=decision.promoted,
            reason=decision.reason,
            metric=promotion.metric,
            value=value,
            published_value=published,
        )
        return decision
