"""Command line: configure logging, load the manifest, run, map the outcome to an exit code."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from service.errors import ExitCode, ManifestError, SpotloraError

if TYPE_CHECKING:
    from service.manifest import JobSpec, LoadedManifest
    from service.settings import RuntimeSettings
    from service.storage import Storage

log = structlog.get_logger("spotlora")

EXAMPLE_MANIFEST = """\
apiVersion: spotlora/v1
kind: FineTuneJob
metadata:
  name: mistral-alpaca            # DNS-1123 label: names the run, its storage prefix, its metrics
spec:
  model:
    source: s3://my-bucket/models/mistral-7b-v0.1/  # or a local dir, or a hub id (+ revision)
  quantization: {quant_type: nf4, double_quant: true, compute_dtype: auto}
  lora: {r: 8, alpha: 16, dropout: 0.05, target_modules: [q_proj, k_proj, v_proj, o_proj]}
  data:
    train: s3://my-bucket/data/alpaca.jsonl          # or a local file/glob
    format: alpaca
    max_length: 512
    eval_fraction: 0.02
  training: {epochs: 3, batch_size: auto, learning_rate: 2.0e-4, seed: 42}
  checkpoint: {every_steps: 50, every_seconds: auto, keep: 2, grace_period_seconds: 15}
  output:
    uri: s3://my-bucket/jobs/mistral-alpaca/         # or a local directory
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spotlora", description="QLoRA fine-tuning as a preemption-safe batch job."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def manifest_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--manifest",
            "-f",
            metavar="PATH|s3://...|-",
            help="job manifest (YAML/JSON; - reads standard input); else $SPOTLORA_MANIFEST "
            "(inline), else $SPOTLORA_MANIFEST_URI",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="PATH=VALUE",
            help="override a field, e.g. training.learning_rate=1e-4 or metadata.name=run-2 "
            "(paths relative to spec unless they start with metadata, spec, kind or apiVersion; "
            "repeatable)",
        )

    manifest_args(sub.add_parser("run", help="run a fine-tuning job"))
    validate = sub.add_parser("validate", help="check a manifest; print it resolved")
    manifest_args(validate)
    validate.add_argument(
        "--gpu-memory-gib",
        type=float,
        metavar="GIB",
        help="also estimate peak GPU memory for a GPU of this size (15 for a T4), reading "
        "only the model's config.json; prints the micro-batch that 'auto' would pick",
    )
    estimate = sub.add_parser(
        "estimate", help="time and cost of a job per GPU type, before it runs"
    )
    manifest_args(estimate)
    estimate.add_argument(
        "--instance-type", action="append", default=[], metavar="T", help="price table entry"
    )
    estimate.add_argument(
        "--history",
        action="append",
        default=[],
        metavar="URI",
        help="earlier runs' output (repeatable); default: the job's output.uri",
    )
    estimate.add_argument(
        "--price-table",
        type=Path,
        metavar="PATH",
        help="default: $SPOTLORA_PRICE_TABLE, else illustrative prices",
    )
    estimate.add_argument("--json", action="store_true", help="print JSON")
    sub.add_parser("schema", help="print the manifest's JSON Schema")
    sub.add_parser("example", help="print an example manifest")
    runs = sub.add_parser("runs", help="a job's runs: history, resume by hand, prune")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    runs_sub.add_parser("list", help="one line per run").add_argument("uri")
    show = runs_sub.add_parser("show", help="one run's record")
    show.add_argument("uri")
    show.add_argument("run_id")
    from service.runs import add_commands

    add_commands(runs_sub)
    sub.add_parser(
        "launch",
        help="run on several processes: spotlora launch [torchrun flags] -- run --manifest FILE",
        description="Everything before '--' is torchrun's (see torchrun --help); after it, "
        "the command each process runs.",
    )
    report = sub.add_parser("report", help="write plots for a finished run")
    report.add_argument("uri", help="the run's output URI (local dir or s3://)")
    export = sub.add_parser(
        "export",
        help="merge a finished run's adapter into its base, verified, under URI/merged/",
    )
    export.add_argument("uri", help="the run's output URI (local dir or s3://), with run.json")
    export.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        help="dtype of the merged weights; default: the run's spec.export.dtype",
    )
    return parser


def _load(args: argparse.Namespace, settings: RuntimeSettings) -> LoadedManifest:
    from service.manifest import load_manifest

    # The manifest is read by load_manifest's own bounded reader: size-checked before it is
    # read whole (a HEAD first on S3), and decoded in one place.
    loaded = load_manifest(
        cli_manifest=args.manifest,
        env_inline=settings.manifest,
        env_uri=settings.manifest_uri,
        overrides=args.overrides,
    )
    return loaded


def finished_run(command: str, uri: str) -> tuple[Storage, dict[str, Any]]:
    """The output at ``uri`` of a finished run, and its run.json."""
    from service.storage import open_storage
    from service.uris import check_storage_uri

    try:
        check_storage_uri(uri)
    except ValueError as err:
        raise ManifestError(f"{command}: URI {uri!r}: {err}") from None
    storage = open_storage(uri)
    try:
        record = json.loads(storage.read_bytes("run.json"))
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no run.json (not a finished run's output)") from None
    except ValueError as err:  # not UTF-8, or not JSON
        raise ManifestError(f"{uri}/run.json: not a run record: {err}") from None
    if not isinstance(record, dict):
        raise ManifestError(f"{uri}/run.json: not a run record (a JSON object)")
    return storage, record


def export_run(args: argparse.Namespace, settings: RuntimeSettings) -> ExitCode:
    """`spotlora export URI`: the merge as its own (CPU) Job after the run, from the manifest
    in the run's run.json. Writes URI/merged/ only: run.json stays as the run wrote it."""
    import hashlib
    import shutil

    from service import export, fetch
    from service.logging import route_library_logging
    from service.manifest import FineTuneJob

    output, record = finished_run("export", args.uri)
    try:
        job = FineTuneJob.model_validate(record["manifest"])
    except (ValueError, KeyError, TypeError) as err:  # pydantic's ValidationError included
        raise ManifestError(f"{args.uri}/run.json: no valid manifest in it: {err}") from None
    adapter = [o for o in output.list_objects("adapter/") if o.key.startswith("adapter/")]
    if not any(o.key == f"adapter/{export.ADAPTER_WEIGHTS}" for o in adapter):
        raise ManifestError(
            f"{args.uri}: no adapter/{export.ADAPTER_WEIGHTS} (run status "
            f"{record.get('status')!r}): nothing to merge"
        )
    wanted = {"merged": True} | ({"dtype": args.dtype} if args.dtype else {})
    spec = job.spec.model_copy(update={"export": job.spec.export.model_copy(update=wanted)})
    structlog.contextvars.bind_contextvars(job=job.metadata.name, command="export")
    route_library_logging(progress_bars=sys.stderr.isatty())
    token = settings.hf_token.get_secret_value() if settings.hf_token else None
    # From config.json alone: too little memory or disk fails before the base downloads,
    # into the same cache as the staged merge, about its size in its own dtype.
    config = fetch.fetch_config(spec.model, token)
    own = spec.model_copy(update={"export": spec.export.model_copy(update={"dtype": "auto"})})
    local = Path(spec.model.source).expanduser().is_dir()
    download = 0 if local else export.merge_needs(own, config).weights_bytes
    export.preflight(
        spec,
        config,
        settings.cache_dir,
        disk_free=lambda path: shutil.disk_usage(path).free - download,
        way_out="give this Job more memory (resources.limits.memory) or cache volume (the "
        f"base's download, {download / 2**30:.1f} GiB, is counted against its free space)",
    )
    model_dir = fetch.fetch_model(spec.model, settings.cache_dir, token)
    work_dir = settings.cache_dir / "export" / hashlib.sha256(args.uri.encode()).hexdigest()[:16]
    shutil.rmtree(work_dir, ignore_errors=True)
    for obj in adapter:
        output.download_file(obj.key, work_dir / obj.key)
    prompts = _export_prompts(spec, settings.cache_dir)
    result = export.export_merged(spec, model_dir, work_dir / "adapter", prompts, output, work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return ExitCode.OK


def _export_prompts(spec: JobSpec, cache_dir: Path) -> list[str]:
    """The run's held-out rows (its training rows if it held none out), read again from its
    data; a few fixed generic prompts when the data is out of reach from here."""
    from service import data
    from service.export import GENERIC_PROMPTS, verification_prompts

    count = spec.export.verify_prompts
    try:
        dataset = data.load_dataset(spec.data, cache_dir)
    except (SpotloraError, OSError, ValueError) as err:
        log.warning("export_prompts_generic", reason=f"{spec.data.train}: {err}")
        return list(GENERIC_PROMPTS[:count])
    log.info("export_prompts", source="eval" if dataset.eval else "train")
    return verification_prompts(dataset.eval or dataset.train, count)


def dispatch(args: argparse.Namespace, settings: RuntimeSettings) -> ExitCode:
    if args.command == "schema":
        from service.manifest import FineTuneJob

        sys.stdout.write(json.dumps(FineTuneJob.model_json_schema(by_alias=True), indent=2) + "\n")
        return ExitCode.OK
    if args.command == "example":
        sys.stdout.write(EXAMPLE_MANIFEST)
        return ExitCode.OK
    if args.command == "runs":
        from service import runs

        return runs.COMMANDS[args.runs_command](args)
    if args.command == "export":
        return export_run(args, settings)
    if args.command == "report":
        from service.report import write_report

        storage, record = finished_run("report", args.uri)
        out = Path(args.uri) if not args.uri.startswith("s3://") else Path.cwd()
        for path in write_report(record, out):
            if args.uri.startswith("s3://"):
                storage.upload_file(path, path.name)
            log.info("report_written", path=str(path))
        return ExitCode.OK
    loaded = _load(args, settings)
    if args.command == "validate":
        import yaml

        doc = loaded.job.model_dump(mode="json", by_alias=True)
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
        if args.gpu_memory_gib:
            from service.estimate.command import memory_report

            sys.stdout.write(memory_report(loaded.job.spec, args.gpu_memory_gib))
        return ExitCode.OK
    if args.command == "estimate":
        from service.estimate.command import main as estimate

        return estimate(args, loaded.job.spec, settings)
    from service.recipe import execute

    return execute(loaded, settings)


def say(text: str) -> None:
    """The one-line error for a person: every line prefixed, control characters escaped, so a
    value from a manifest or a path cannot forge a log event or drive the terminal."""
    from service.logging import escape_controls

    for line in str(text).split("\n"):
        sys.stderr.write(f"spotlora: {escape_controls(line)}\n")


# Commands that run a job: a SIGTERM while their libraries import (seconds, as PID 1) is
# kept for the run to handle as a preemption. Every other command keeps the default
# handlers, so Ctrl-C stops it.
JOB_COMMANDS = ("run", "launch")


def main(argv: Sequence[str] | None = None) -> int:
    as_program = argv is None  # not a test calling in
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in JOB_COMMANDS:
        from service.signals import catch_early_signals

        catch_early_signals()  # the entrypoint did already; `spotlora run` comes here first
    try:
        return _main(argv)
    except KeyboardInterrupt:
        say("interrupted")
        return 128 + signal.SIGINT
    finally:
        if as_program:
            # The interpreter's exit would collect every object the run made: 7 s on a small
            # CPU job, past a preempted pod's grace period. The process's end frees them.
            import gc

            gc.freeze()


def _main(argv: list[str]) -> int:
    from pydantic import ValidationError

    from service.logging import configure_logging
    from service.settings import RuntimeSettings, describe

    try:
        settings = RuntimeSettings()
    except ValidationError as err:  # a malformed SPOTLORA_* variable
        say(f"invalid environment: {describe(err)}")
        return ExitCode.INVALID_INPUT
    # Values to scrub from every log line, whatever key or library carries them.
    from service.tracking import SECRET_ENV_VARS

    given = [
        os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", *SECRET_ENV_VARS)
    ]
    for secret in (settings.hf_token, settings.pushgateway_password):
        if secret is not None:
            given.append(secret.get_secret_value())
    secrets = tuple(s for s in given if s)
    configure_logging(settings.log_format, settings.log_level, secrets)
    if argv[:1] == ["launch"] and not _asks_help(argv):  # torchrun's flags: not ours to parse
        from service.distributed import launch

        try:
            return launch(argv[1:])
        except SpotloraError as err:
            say(str(err))
            return err.exit_code
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:
        return ExitCode.OK if exit_.code == 0 else ExitCode.INVALID_INPUT
    code = _dispatch_reporting(args, settings)
    if args.command == "run":
        from service.distributed import record_outcome

        record_outcome(code)
    return code


def _asks_help(argv: list[str]) -> bool:
    """``launch --help`` is ours to answer, without importing torch."""
    ours = argv[: argv.index("--")] if "--" in argv else argv
    return "-h" in ours or "--help" in ours


def _dispatch_reporting(args: argparse.Namespace, settings: RuntimeSettings) -> int:
    try:
        return dispatch(args, settings)
    except SpotloraError as err:
        log.error(
            "job_failed", error=str(err), exit_code=int(err.exit_code), outcome=type(err).__name__
        )
        say(str(err))
        return err.exit_code
    except Exception:
        log.exception("job_crashed", exit_code=int(ExitCode.UNEXPECTED))
        return ExitCode.UNEXPECTED
