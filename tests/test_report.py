from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest

from service.report import summary, throughput, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_record() -> dict:
    history: list[dict] = []
    for step in range(10, 101, 10):
        # A pod restart after step 50: trl's num_tokens starts again from zero.
        tokens = 1000.0 * (step if step <= 50 else step - 50)
        history.append(
            {
                "loss": 3.0 - step / 100,
                "grad_norm": 0.5,
                "learning_rate": 2e-4 * (1 - step / 100),
                "entropy": 2.9,
                "mean_token_accuracy": 0.4,
                "num_tokens": tokens,
                "epoch": step / 50,
                "step": step,
                "time": 1000.0 + step * 2.0 + (300.0 if step > 50 else 0.0),
            }
        )
        if step % 50 == 0:
            history.append({"eval_loss": 3.1 - step / 100, "epoch": step / 50, "step": step})
    history.append({"train_runtime": 500.0, "train_loss": 2.5, "epoch": 2.0, "step": 100})
    return {
        "name": "tiny <job>",  # run.json's key for metadata.name
        "log_history": history,
        "events": [
            {"type": "checkpoint", "step": 40, "time": 1080.0},
            {"type": "preempted", "step": 55, "time": 1110.0},
            {"type": "resumed", "step": 40, "time": 1400.0},
            {"type": "checkpoint", "step": 100, "time": 1500.0},
        ],
    }


def test_writes_a_png_and_a_self_contained_html(tmp_path: Path) -> None:
    paths = write_report(run_record(), tmp_path / "out")
    assert [p.name for p in paths] == ["report.png", "report.html"]
    png, page = paths
    assert png.read_bytes().startswith(PNG_MAGIC)
    text = page.read_text()
    assert "tiny &lt;job&gt;" in text and "<job>" not in text  # escaped
    inlined = re.search(r'src="data:image/png;base64,([^"]+)"', text)
    assert inlined is not None
    assert base64.b64decode(inlined.group(1)) == png.read_bytes()
    assert "http" not in text  # nothing fetched from elsewhere


def test_throughput_skips_the_pair_across_a_restart() -> None:
    steps, rates = throughput(run_record()["log_history"])
    # 9 consecutive pairs, minus the one across the restart (num_tokens fell).
    assert len(steps) == 8 and 60 not in steps
    assert rates == pytest.approx([10_000 / 20.0] * 8)


def test_summary_figures() -> None:
    facts = summary(run_record())
    assert facts["steps"] == "100"
    assert facts["final train loss"] == "2.0000"
    assert facts["best eval loss"] == "2.1000"
    assert facts["median tokens/s"] == "500"
    assert (facts["checkpoints"], facts["preemptions"], facts["resumes"]) == ("2", "1", "1")


def test_preemptions_include_attempts_killed_outright() -> None:
    """A SIGKILLed attempt writes no event; the ledger counts it from its attempt record."""
    record = run_record()
    record["cost"] = {"attempts": 3, "preemptions": 2}
    assert summary(record)["preemptions"] == "2"


@pytest.mark.parametrize(
    "record",
    [
        {},
        {"name": "empty", "log_history": [], "events": []},
        {"log_history": [{"loss": float("nan"), "step": 1}, {"loss": None, "step": 2}]},
        {"log_history": [{"loss": 1.0, "step": 1}], "events": [{"type": "unknown", "step": 1}]},
    ],
)
def test_sparse_or_odd_records_still_render(tmp_path: Path, record: dict) -> None:
    png, page = write_report(record, tmp_path)
    assert png.stat().st_size > 0 and page.stat().st_size > 0


def test_only_steps_trained_again_are_shaded() -> None:
    """A stop that committed its last step redid nothing: no shading, so no legend entry."""
    from matplotlib.figure import Figure

    from service.report import _shade_lost_work

    ax = Figure().subplots()
    kept = [
        {"type": "preempted", "step": 41, "time": 1.0},
        {"type": "resumed", "step": 41, "time": 2.0},
    ]
    assert _shade_lost_work(ax, kept) is False
    assert _shade_lost_work(ax, run_record()["events"]) is True  # preempted at 55, resumed at 40
