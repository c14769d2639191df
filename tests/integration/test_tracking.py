"""A real run reports to all three trackers at once, and what they stored is read back with
their own readers: TensorBoard's EventAccumulator on the published event files, an MLflow file
store through MlflowClient, and a W&B offline run file record by record. No network."""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.manifest import FineTuneJob
from service.storage import open_storage
from service.tracking import (
    TENSORBOARD_DIR,
    configure_tracking,
    finish_tracking,
    publish_tensorboard,
    publish_wandb_offline,
)
from tests.jobs import manifest

MLFLOW_SECRET = "mlflow-password-9f3c1e7a2b"
WANDB_SECRET = "0123456789abcdef0123456789abcdef01234567"
STEPS = 6


@pytest.fixture(autouse=True)
def restore_environ() -> Iterator[None]:
    """configure_tracking sets process environment variables, as it does in a pod."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a .wandb file. It is a LevelDB-style log (32 KiB blocks, each
    record a 7-byte header and a chunk) after a 7-byte ':W&B' header; wandb ships no Python
    reader for it since its writer moved into wandb-core."""
    from wandb.proto import wandb_internal_pb2

    block_bytes, header_bytes = 32768, 7
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    offset, chunk = header_bytes, b""
    while offset + header_bytes <= len(data):
        left_in_block = block_bytes - offset % block_bytes
        if left_in_block < header_bytes:  # the block's zero-padded tail
            offset += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + header_bytes])
        if kind == 0 and length == 0:
            break
        chunk += data[offset + header_bytes : offset + header_bytes + length]
        offset += header_bytes + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def wandb_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def every_file_text(root: Path) -> str:
    return "\n".join(
        p.read_bytes().decode("latin-1") for p in sorted(root.rglob("*")) if p.is_file()
    )


def test_a_run_reports_to_tensorboard_mlflow_and_wandb_without_leaking_secrets(
    tiny_model: Path,
    tiny_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from service import data, model
    from service.trainer import build_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", WANDB_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "spotlora")
    # The image installs tensorboardX alone (the light writer): make transformers fall back
    # to it here too, although the dev install also has tensorboard, for its reader.
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    caplog.set_level(logging.DEBUG)
    store = tmp_path / "mlruns"
    output = tmp_path / "output"
    job = FineTuneJob.model_validate(
        manifest(
            "tracked",
            str(tiny_model),
            str(tiny_data),
            str(output),
            training={"max_steps": STEPS},
            data={"eval_fraction": 0.2},
            tracking={
                "tensorboard": True,
                "mlflow_tracking_uri": str(store),
                "wandb_project": "spotlora-tests",
            },
        )
    )
    spec, run_id, work_dir = job.spec, "run-7", tmp_path / "work"
    work_dir.mkdir()

    report_to = configure_tracking(job, run_id, work_dir)
    assert report_to == ["tensorboard", "mlflow", "wandb"]
    device = model.Device("cpu", "cpu")  # CPU even where a GPU is visible: on_cpu below
    dtype = model.resolve_compute_dtype(spec.quantization.compute_dtype, device)
    dataset = data.load_dataset(spec.data, tmp_path / "cache")
    peft_model, tokenizer, _ = model.prepare(spec, tmp_path / "cache", dtype, device, None)
    trainer = build_trainer(
        spec,
        peft_model,
        tokenizer,
        dataset.train,
        dataset.eval,
        dtype=dtype,
        on_cpu=True,
        work_dir=work_dir / "trainer",
        callbacks=[],
        show_progress_bar=False,
        report_to=report_to,
    )
    trainer.train()
    eval_loss = trainer.evaluate()["eval_loss"]  # after training, as the recipe does
    finish_tracking("FINISHED", trainer)
    publish_tensorboard(work_dir / TENSORBOARD_DIR, open_storage(str(output)))
    publish_wandb_offline(work_dir / "wandb", open_storage(str(output)))
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, STEPS + 1))

    # TensorBoard: the event files are in the run's output, train and eval scalars in them.
    events = EventAccumulator(str(output / TENSORBOARD_DIR))
    events.Reload()
    assert {"train/loss", "train/learning_rate", "eval/loss"} <= set(events.Tags()["scalars"])
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx({h["step"]: h["loss"] for h in logged})
    assert events.Scalars("eval/loss")[-1].value == pytest.approx(eval_loss)

    # MLflow: one run, named by the run id, holding the training and the later eval metrics.
    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("tracked")  # default: metadata.name
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    run = runs[0]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(tb_loss)
    assert run.data.metrics["eval_loss"] == pytest.approx(eval_loss)
    assert run.data.params["learning_rate"] == "0.001"
    assert run.data.params["max_steps"] == str(STEPS)
    assert run.data.tags["spotlora.run_id"] == run_id
    params = json.dumps(run.data.params) + json.dumps(run.data.tags)

    # W&B: the offline run, under the work dir and published to the output, with the history.
    offline = sorted((work_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith("-run-7")
    published = output / "wandb" / offline[0].name / "run-run-7.wandb"
    assert published.is_file()
    rows = wandb_history(published)
    wandb_loss = {r["train/global_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert wandb_loss == pytest.approx(tb_loss)
    assert any(r.get("eval/loss") == pytest.approx(eval_loss) for r in rows)

    # No secret anywhere: not in the output, the params, a log record or a written file.
    captured = capfd.readouterr()
    for secret in (MLFLOW_SECRET, WANDB_SECRET):
        assert secret not in captured.out + captured.err
        assert secret not in caplog.text
        assert secret not in params
        assert secret not in every_file_text(tmp_path)
