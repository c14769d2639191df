"""What the model now generates, and how it scores: greedy samples from the base and from the
trained adapter side by side, and task metrics against the eval split's reference responses.

"Before" is the base with the adapter switched off (peft's disable_adapter), so a resumed or
warm-started run reports the same baseline as a fresh one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import structlog

from service.errors import ManifestError
from service.manifest.results import EvaluationSpec
from service.manifest.spec import JobSpec

log = structlog.get_logger(__name__)

GENERATION_BATCH = 16


@dataclass(frozen=True)
class Example:
    prompt: str  # as the model sees it: the row's template (or chat template) applied
    reference: str | None  # the eval row's response, when there is one


def examples_from_rows(rows: Sequence[dict[str, Any]], tokenizer: Any, n: int) -> list[Example]:
    """The first ``n`` shaped rows (service.data) with a prompt/response split."""
    out: list[Example] = []
    for row in rows:
        if len(out) == n:
            break
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            out.append(Example(prompt, completion))
        elif isinstance(prompt, list) and isinstance(completion, list) and completion:
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            out.append(Example(text, completion[-1]["content"]))
    return out


def _batches(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: Callable[[], None] | None = None,
) -> list[str]:
    """Greedy responses, batched with left padding; the model is left as it was found.
    ``stop`` is called before each batch: it raises to end the generation early (a stop
    requested after training must not wait for a thousand samples)."""
    import torch

    from service.model import disable_cpu_inference_repack

    disable_cpu_inference_repack(model)  # an evaluation must not change training afterwards
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    responses: list[str] = []
    try:
        with torch.no_grad():
            for batch in _batches(prompts, GENERATION_BATCH):
                if stop is not None:
                    stop()
                # As trl tokenized the prompts it trained on: with the tokenizer's special
                # tokens, unless a chat template already put them in the text.
                bos = tokenizer.bos_token
                templated = bool(bos) and all(text.startswith(bos) for text in batch)
                encoded = tokenizer(
                    list(batch), return_tensors="pt", padding=True, add_special_tokens=not templated
                ).to(model.device)
                generated = model.generate(
                    **encoded,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    use_cache=True,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = generated[:, encoded["input_ids"].shape[1] :]
                responses.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def score(
    responses: Sequence[str], references: Sequence[str], metrics: Sequence[str], pattern: str | None
) -> dict[str, float]:
    """Share of responses that pass each metric (0..1)."""
    out: dict[str, float] = {}
    pairs = list(zip(responses, references, strict=True))
    if not pairs:
        return out
    for metric in metrics:
        if metric == "exact_match":
            hits = sum(r.strip() == ref.strip() for r, ref in pairs)
        elif metric == "contains":
            hits = sum(ref.strip() in r for r, ref in pairs)
        elif metric == "regex":
            assert pattern is not None  # the manifest requires one
            hits = sum(
                re.search(pattern.replace("{reference}", re.escape(ref.strip())), r) is not None
                for r, ref in pairs
            )
        else:
            raise ManifestError(f"spec.evaluation.metrics: unknown metric {metric!r}")
        out[metric] = hits / len(pairs)
    return out


def evaluate(
    trainer: Any,
    eval_rows: Sequence[dict[str, Any]],
    spec: EvaluationSpec,
    stop: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Samples (base and trained side by side) and task metrics (both), for run.json;
    ``stop`` as generate's."""
    if not spec.samples and not spec.metrics:
        return None
    model, tokenizer = trainer.model, trainer.processing_class
    rows = examples_from_rows(eval_rows, tokenizer, max(spec.max_rows, spec.samples))
    scored = [e for e in rows if e.reference is not None][: spec.max_rows]
    sampled = (
        [Example(p, None) for p in spec.prompts][: spec.samples or len(spec.prompts)]
        if spec.prompts
        else rows[: spec.samples]
    )
    prompts = list(dict.fromkeys([e.prompt for e in sampled] + [e.prompt for e in scored]))
    results: dict[str, dict[str, str]] = {}
    for name, context in (("before", _without_adapter(model)), ("after", nullcontext())):
        with context:
            answers = generate(
                model, tokenizer, prompts, max_new_tokens=spec.max_new_tokens, stop=stop
            )
        results[name] = dict(zip(prompts, answers, strict=True))
    record: dict[str, Any] = {
        "samples": [
            {
                "prompt": e.prompt,
                "reference": e.reference,
                "before": results["before"][e.prompt],
                "after": results["after"][e.prompt],
            }
            for e in sampled
        ],
        "metrics": {
            side: score(
                [results[side][e.prompt] for e in scored],
                [e.reference or "" for e in scored],
                spec.metrics,
                spec.pattern,
            )
            for side in ("before", "after")
        },
        "rows_scored": len(scored),
        "max_new_tokens": spec.max_new_tokens,
    }
    log.info("evaluation", rows_scored=len(scored), samples=len(sampled), **record["metrics"])
    return record


def evaluate_trained(
    trainer: Any,
    eval_rows: Sequence[dict[str, Any]],
    spec: EvaluationSpec,
    stop: Callable[[], None],
) -> tuple[float | None, dict[str, Any] | None]:
    """After training: the eval loss (with eval data), then samples and task metrics."""
    has_eval = trainer.eval_dataset is not None
    eval_loss = trainer.evaluate().get("eval_loss") if has_eval else None
    log.info("evaluated", eval_loss=eval_loss)
    return eval_loss, evaluate(trainer, eval_rows, spec, stop)


def gate(
    trainer: Any,
    eval_rows: Sequence[dict[str, Any]],
    spec: JobSpec,
    eval_loss: float | None,
    found: dict[str, Any] | None,
    stop: Callable[[], None] | None = None,
) -> tuple[float | None, Callable[[Path], float] | None]:
    """The promotion gate's measure: this run's value of promotion.metric, and how to take the
    same measure of another adapter (None without eval data)."""
    from service.trainer import evaluate_adapter, other_adapter

    metric = spec.promotion.metric
    if trainer.eval_dataset is None:
        return None, None
    if metric == "eval_loss":
        return eval_loss, partial(evaluate_adapter, trainer)
    model, tokenizer, ev = trainer.model, trainer.processing_class, spec.evaluation
    scored = [e for e in examples_from_rows(eval_rows, tokenizer, ev.max_rows) if e.reference]

    def measure(adapter: Path) -> float:
        with other_adapter(model, adapter):
            answers = generate(
                model,
                tokenizer,
                [e.prompt for e in scored],
                max_new_tokens=ev.max_new_tokens,
                stop=stop,
            )
        return score(answers, [e.reference or "" for e in scored], [metric], ev.pattern)[metric]

    return (found or {}).get("metrics", {}).get("after", {}).get(metric), measure


def _without_adapter(model: Any) -> Any:
    disable = getattr(model, "disable_adapter", None)
    return disable() if disable is not None else nullcontext()
