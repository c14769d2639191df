"""The shape of the package: one way imports flow, small rooms, and commands that do not pay
for libraries they never use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

SERVICE = REPO / "service"
# Lower layers never import higher ones. A new module must be placed here.
LAYERS = {
    # foundations: no other service module below them
    "service": 0,
    "service.errors": 0,
    "service.uris": 0,
    "service.versions": 0,
    "service.chat_templates": 0,
    "service.logging": 0,
    "service.signals": 0,
    "service.settings": 1,
    "service.estimate.gpus": 0,
    # the job and where bytes live
    "service.manifest": 1,
    "service.manifest.spec": 1,
    "service.manifest.load": 1,
    "service.manifest.base": 1,
    "service.manifest.data": 1,
    "service.manifest.running": 1,
    "service.manifest.results": 1,
    "service.storage": 1,
    "service.storage.base": 1,
    "service.storage.local": 1,
    "service.storage.s3": 1,
    "service.storage.cache": 1,
    # one concern each, knowing nothing of the run that combines them
    "service.distributed": 2,
    "service.preemption": 2,
    "service.attempts": 2,
    "service.history": 2,
    "service.memory": 2,
    # the speed layer: a policy, probes and compilers under one replacement module each
    "service.fast": 2,
    "service.fast.policy": 2,
    "service.fast.probe": 2,
    "service.fast.nvrtc": 2,
    "service.fast.elementwise": 2,
    "service.fast.rms_norm": 2,
    "service.fast.lora": 2,
    "service.fast.rotary": 2,
    "service.fast.swiglu": 2,
    "service.fast.logprob": 2,
    "service.fast.offload": 2,
    "service.targets": 2,
    "service.fetch": 2,
    "service.ledger": 2,
    "service.checkpoint.interval": 2,
    "service.report": 2,
    "service.data": 2,
    "service.data.read": 2,
    "service.data.shape": 2,
    "service.checkpoint": 2,
    "service.checkpoint.store": 2,
    "service.checkpoint.committer": 2,
    "service.metrics": 2,
    "service.metrics.push": 2,
    "service.metrics.registry": 2,
    "service.metrics.instruments": 2,
    "service.metrics.phase": 2,
    "service.estimate": 2,
    "service.estimate.throughput": 2,
    "service.estimate.past": 2,
    # what training and publishing are made of
    "service.model": 3,
    "service.trainer": 3,
    "service.checkpoint.resume": 3,
    "service.checkpoint.safepoint": 3,
    "service.checkpoint.endgame": 3,
    "service.metrics.callback": 3,
    "service.retraining": 3,
    "service.publication": 3,
    "service.export": 3,
    "service.export.preflight": 2,
    "service.record": 3,
    "service.observer": 3,
    "service.tracking": 3,
    "service.evaluation": 3,
    "service.runs": 3,
    "service.estimate.job": 3,
    "service.estimate.run": 3,
    # the one module that wires them, and the command line above it
    "service.recipe": 4,
    "service.estimate.command": 4,
    "service.cli": 5,
    "service.__main__": 5,
}
MAX_MODULE_LINES = 410
MAX_CLASS_LINES = 220
HEAVY = ("torch", "transformers", "datasets", "trl", "peft", "bitsandbytes", "accelerate")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def service_imports(tree: ast.AST) -> set[str]:
    """Every service module imported anywhere in the file, inside functions too."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("service")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("service"):
            found.add(node.module)
            # `from service import data` imports the module service.data
            found |= {f"{node.module}.{a.name}" for a in node.names} & LAYERS.keys()
    return found


MODULES = sorted(SERVICE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    assert {module_name(p) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_lower_layers_never_import_higher_ones(path: Path) -> None:
    name = module_name(path)
    for imported in service_imports(ast.parse(path.read_text())):
        target = imported if imported in LAYERS else imported.rsplit(".", 1)[0]
        assert LAYERS[target] <= LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {target}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_rooms_stay_small(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno is not None
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, node.name


PROBE = """
import json, sys
from service.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in {heavy} if m in sys.modules)
print(json.dumps({{"code": int(code), "heavy": heavy}}), file=sys.stderr)
"""


# Every command's --help: each answers (exit 0) without loading a training library.
HELPS = [
    [*command, "--help"]
    for command in (
        [],
        ["run"],
        ["validate"],
        ["schema"],
        ["example"],
        ["runs"],
        ["runs", "list"],
        ["runs", "show"],
        ["runs", "resume"],
        ["runs", "prune"],
        ["launch"],
        ["report"],
        ["export"],
    )
]


@pytest.mark.parametrize(
    "argv",
    [*HELPS, ["example"], ["schema"], ["validate", "-f", "{job}"], ["run", "-f", "{bad}"]],
    ids=[
        *(" ".join(h[:-1]) + " help" if h[:-1] else "help" for h in HELPS),
        "example",
        "schema",
        "validate",
        "run-with-bad-manifest",
    ],
)
def test_commands_that_train_nothing_import_no_training_library(
    argv: list[str], tmp_path: Path
) -> None:
    from service.cli import EXAMPLE_MANIFEST

    (tmp_path / "job.yaml").write_text(EXAMPLE_MANIFEST)
    (tmp_path / "bad.yaml").write_text("apiVersion: spotlora/v1\nkind: Nope\n")
    args = [a.format(job=tmp_path / "job.yaml", bad=tmp_path / "bad.yaml") for a in argv]
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=repr(HEAVY)), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(done.stderr.strip().splitlines()[-1])
    failing = argv[0] == "run" and "--help" not in argv
    assert result["code"] == (2 if failing else 0), done.stderr[-2000:]
    assert result["heavy"] == []
    if "--help" in argv:
        assert done.stdout.startswith("usage: spotlora"), done.stdout


def test_the_early_signal_catch_imports_nothing_but_the_standard_library() -> None:
    """The entrypoint installs it before anything else loads: any import it pulls in is time
    during which a SIGTERM would kill the process outright."""
    probe = (
        "import sys; before = set(sys.modules); import service.signals; "
        "print(sorted(m for m in set(sys.modules) - before "
        "if m.split('.')[0] not in sys.stdlib_module_names))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "['service', 'service.signals']", done.stderr
    # ...and the entrypoint calls it before it imports the command line.
    entry = ast.parse((REPO / "entrypoint.py").read_text())
    nodes = [n for n in ast.walk(entry) if isinstance(n, ast.ImportFrom | ast.Call)]
    order = [
        getattr(n, "module", None) or getattr(getattr(n, "func", None), "id", None)
        for n in sorted(nodes, key=lambda n: (n.lineno, n.col_offset))
    ]
    assert order.index("catch_early_signals") < order.index("service.cli")
