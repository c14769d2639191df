"""k8s/examples/export-job.yaml: `spotlora export` as its own CPU Job. Valid for the oldest
supported Kubernetes, hardened as the trainer is, failing on the codes a retry cannot fix,
and with the memory the pre-flight asks for a 7B bf16 merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploy_support import K8S, MIN_KUBERNETES_VERSION

EXPORT_JOB = K8S / "examples" / "export-job.yaml"
GIB = 2**30
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def docs() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(EXPORT_JOB.read_text()) if doc]


def job() -> dict[str, Any]:
    [found] = [doc for doc in docs() if doc["kind"] == "Job"]
    return found


def pod() -> dict[str, Any]:
    return dict(job()["spec"]["template"]["spec"])


def container() -> dict[str, Any]:
    [only] = pod()["containers"]
    return dict(only)


def quantity_bytes(value: str) -> int:
    for suffix, factor in UNITS.items():
        if value.endswith(suffix):
            return int(float(value.removesuffix(suffix)) * factor)
    return int(value)


def test_validates_strictly() -> None:
    for doc in docs():
        try:
            kubernetes_validate.validate(doc, MIN_KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message}")


def test_runs_the_export_command_on_a_run_uri() -> None:
    args = container()["args"]
    assert args[0] == "export" and args[1].startswith("s3://") and len(args) == 2


def test_needs_no_gpu() -> None:
    resources = container()["resources"]
    for section in ("requests", "limits"):
        assert not any("gpu" in name for name in resources[section]), section
    assert "tolerations" not in pod() and "nodeSelector" not in pod()


def test_pod_is_hardened_like_the_trainer() -> None:
    trainer = yaml.safe_load((K8S / "base" / "trainer-job.yaml").read_text())
    trainer_pod = trainer["spec"]["template"]["spec"]
    [trainer_container] = trainer_pod["containers"]
    assert pod()["securityContext"] == trainer_pod["securityContext"]
    assert container()["securityContext"] == trainer_container["securityContext"]
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod()["automountServiceAccountToken"] is False
    assert pod()["serviceAccountName"] == trainer_pod["serviceAccountName"]
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod()["volumes"]}
    for path in ("/tmp", "/var/cache/spotlora"):
        assert "emptyDir" in volumes[mounts[path]], path
    env = {e["name"]: e.get("value") for e in container()["env"]}
    assert env["SPOTLORA_CACHE_DIR"] == "/var/cache/spotlora" and env["HOME"] == "/tmp"


def test_failure_policy_follows_the_exit_codes() -> None:
    from service.errors import ExitCode
    from service.export import ExportMismatch

    spec = job()["spec"]
    assert pod()["restartPolicy"] == "Never" and spec["podReplacementPolicy"] == "Failed"
    fail = [r for r in spec["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
    [rule] = fail
    assert rule["onExitCodes"]["containerName"] == container()["name"]
    assert rule["onExitCodes"]["operator"] == "In"
    fatal = {int(ExitCode.INVALID_INPUT), int(ExportMismatch.exit_code)}
    assert set(rule["onExitCodes"]["values"]) == fatal
    # Unreachable storage is worth retrying: not failed at once.
    assert int(ExitCode.DEPENDENCY_UNREACHABLE) not in rule["onExitCodes"]["values"]


def test_memory_and_disk_fit_a_7b_merge_in_bf16() -> None:
    """The pre-flight would refuse a limit under its estimate, before the base downloads."""
    from service.export import merge_needs
    from tests.test_export import job_spec, llama_config

    spec, config = job_spec(), llama_config()  # Mistral-7B's shape, bf16, the trained base
    needs = merge_needs(spec, config)
    resources = container()["resources"]
    limit = quantity_bytes(resources["limits"]["memory"])
    assert needs.memory_bytes <= limit == quantity_bytes(resources["requests"]["memory"])
    assert limit <= 24 * GIB, "meant to fit a 32 GiB node"
    cache = next(v for v in pod()["volumes"] if v["name"] == "cache")
    # The downloaded base and the staged merged copy, both under the cache.
    assert needs.weights_bytes + needs.disk_bytes <= quantity_bytes(cache["emptyDir"]["sizeLimit"])
    total = sum(quantity_bytes(v["emptyDir"]["sizeLimit"]) for v in pod()["volumes"])
    assert total <= quantity_bytes(resources["limits"]["ephemeral-storage"])


def test_no_ingress_to_the_export_pod() -> None:
    [policy] = [doc for doc in docs() if doc["kind"] == "NetworkPolicy"]
    labels = job()["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"] and not policy["spec"].get("ingress")


def test_checkov(tmp_path: Path) -> None:
    from test_checkov import passed, run_checkov

    copy = tmp_path / EXPORT_JOB.name
    copy.write_text(EXPORT_JOB.read_text())
    reports = run_checkov("--framework", "kubernetes", "-f", str(copy))
    assert passed(reports) > 50, "checkov ran too few checks: did it see the manifest?"


def test_the_command_it_runs_exists() -> None:
    from service.cli import _parser

    args = _parser().parse_args(container()["args"])
    assert args.command == "export" and args.dtype is None
