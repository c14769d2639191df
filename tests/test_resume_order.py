"""What a resumed attempt must keep from the checkpoint it continues, and what it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from service.checkpoint.resume import (
    RunOrder,
    fit_micro_batch,
    order_settings,
    plan_resume,
    rows_sha256,
)
from service.cli import EXAMPLE_MANIFEST
from service.distributed import launcher_exit_code, record_outcome, recorded_outcome
from service.errors import ExitCode, ManifestError
from service.manifest import JobSpec, validate_document

ROWS = [{"prompt": "p1", "completion": "c1"}, {"prompt": "p2", "completion": "c2"}]


def spec(**training: Any) -> JobSpec:
    """The example job at the fixed batch these cases record (4 rows x 4 micro-batches)."""
    doc = yaml.safe_load(EXAMPLE_MANIFEST)
    doc["spec"]["training"].update({"batch_size": 4, "gradient_accumulation": 4, **training})
    return validate_document(doc, "job.yaml").spec


def recorded(s: JobSpec, micro_batch: int = 4, accumulation: int = 4, world: int = 1) -> RunOrder:
    return RunOrder(micro_batch, accumulation, world, rows_sha256(ROWS), order_settings(s))


def plan(s: JobSpec, order: RunOrder | None, world: int = 1, rows: str | None = None) -> Any:
    return plan_resume(
        order, step=10, spec=s, world_size=world, train_rows=rows or rows_sha256(ROWS)
    )


def refusal(s: JobSpec, order: RunOrder, **kwargs: Any) -> str:
    with pytest.raises(ManifestError) as info:
        plan(s, order, **kwargs)
    return str(info.value)


def test_a_fresh_run_sizes_its_own_batch() -> None:
    assert plan(spec(), None).micro_batch is None


def test_auto_keeps_the_checkpoints_micro_batch_whatever_this_gpu_would_pick() -> None:
    s = spec(batch_size="auto")
    got = plan(s, recorded(s, micro_batch=32, accumulation=1))
    assert (got.micro_batch, got.gradient_accumulation) == (32, 1)


def test_an_explicit_batch_equal_to_the_recorded_one_is_kept() -> None:
    s = spec(batch_size=4)
    assert plan(s, recorded(s)).micro_batch == 4


def test_a_changed_batch_size_is_refused_naming_it() -> None:
    msg = refusal(spec(batch_size=2), recorded(spec(batch_size=4)))
    assert "cannot resume the checkpoint at step 10" in msg
    assert "spec.training.batch_size: 4 rows per micro-batch then, 2 now" in msg


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"gradient_accumulation": 8}, "spec.training.gradient_accumulation: 4 then, 8 now"),
        ({"max_steps": 500}, "spec.training.max_steps: None then, 500 now"),
        ({"seed": 1}, "spec.training.seed: 42 then, 1 now"),
        ({"learning_rate": 1e-4}, "spec.training.learning_rate: 0.0002 then, 0.0001 now"),
    ],
)
def test_settings_that_decide_the_order_or_the_update_are_refused(
    change: dict[str, Any], named: str
) -> None:
    assert named in refusal(spec(**change), recorded(spec()))


def test_settings_that_change_neither_are_allowed() -> None:
    before = recorded(spec())
    s = spec(logging_steps=1, eval_steps=None, torch_compile=True, gradient_checkpointing=False)
    assert plan(s, before).micro_batch == 4
    # Where the saved activations wait changes no number: offload may be switched on a resume.
    assert plan(spec(offload_activations=True), before).micro_batch == 4


def test_another_process_count_is_refused() -> None:
    msg = refusal(spec(), recorded(spec(), world=2), world=1)
    assert "processes: 2 then, 1 now" in msg


def test_other_training_rows_are_refused() -> None:
    msg = refusal(spec(), recorded(spec()), rows=rows_sha256(ROWS[:1]))
    assert "spec.data.train: the training rows' content differs" in msg


def test_state_from_an_older_image_is_none_not_an_error() -> None:
    assert RunOrder.from_state(None) is None
    assert RunOrder.from_state({"micro_batch": 4}) is None
    state = recorded(spec()).state_dict()
    assert RunOrder.from_state(state) == recorded(spec())


@pytest.mark.parametrize(
    ("recorded_batch", "accumulation", "fits", "expected"),
    [(32, 1, 64, (32, 1)), (32, 1, 20, (16, 2)), (24, 2, 10, (8, 6)), (7, 1, 3, (1, 7))],
)
def test_a_recorded_micro_batch_too_big_for_this_gpu_is_split_keeping_rows_per_step(
    recorded_batch: int, accumulation: int, fits: int, expected: tuple[int, int]
) -> None:
    micro, accum = fit_micro_batch(recorded_batch, accumulation, fits)
    assert (micro, accum) == expected
    assert micro * accum == recorded_batch * accumulation


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], ExitCode.OK),
        ([75, 75], ExitCode.PREEMPTED),
        ([75, 76], ExitCode.PREEMPTED),
        ([76, 76], ExitCode.PREEMPTED_NO_PROGRESS),
        ([77, 1], ExitCode.SUPERSEDED),
        ([78, 0], ExitCode.PUBLICATION_CONFLICT),
        ([2, 75], ExitCode.INVALID_INPUT),
        ([75, 1], ExitCode.UNEXPECTED),
    ],
)
def test_launcher_exit_code_keeps_the_most_specific_outcome(
    codes: list[int], expected: ExitCode
) -> None:
    assert launcher_exit_code(codes) == expected


@pytest.mark.parametrize(
    ("rank", "code", "workers", "expected"),
    [
        (1, 75, 1, ExitCode.PREEMPTED),  # a pod without rank 0: its own rank's outcome
        (1, 76, 1, ExitCode.PREEMPTED_NO_PROGRESS),
        (1, 2, 1, ExitCode.INVALID_INPUT),
        (2, 75, 2, ExitCode.PREEMPTED),  # the other worker unknown; the run moved forward
        (None, None, 1, ExitCode.PREEMPTED_NO_PROGRESS),  # killed before recording: counted
    ],
)
def test_a_signalled_launcher_exits_with_its_own_workers_outcome(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    rank: int | None,
    code: int | None,
    workers: int,
    expected: ExitCode,
) -> None:
    monkeypatch.setenv("SPOTLORA_OUTCOME_DIR", str(tmp_path))
    if rank is not None and code is not None:
        monkeypatch.setenv("RANK", str(rank))
        record_outcome(code)
    assert recorded_outcome(tmp_path, workers) == expected
