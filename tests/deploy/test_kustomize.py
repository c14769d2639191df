"""Every kustomization renders, validates against the oldest supported Kubernetes, and keeps
the pod hardening, image pinning and scheduling rules of the brief."""

from __future__ import annotations

import re

import kubernetes_validate
import pytest
from deploy_support import (
    GPU_OVERLAYS,
    MIN_KUBERNETES_VERSION,
    OVERLAYS,
    RENDERABLE,
    TRAINER,
    find,
    find_all,
    job,
    pod_spec,
    rendered,
    tolerates,
    trainer,
)

# Kinds with no schema bundled in kubernetes-validate (CRDs); checked by hand below.
CUSTOM_KINDS = {"PodMonitor"}


def all_containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_templates(docs: list[dict]) -> list[dict]:
    """The pod specs of the Job and of the CronJob's jobTemplate."""
    specs = [job(docs)["spec"]["template"]["spec"]]
    specs += [
        c["spec"]["jobTemplate"]["spec"]["template"]["spec"] for c in find_all(docs, "CronJob")
    ]
    return specs


@pytest.mark.parametrize("name", RENDERABLE)
def test_renders_and_validates_strictly(name: str) -> None:
    docs = rendered(name)
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, MIN_KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {err.message}")


@pytest.mark.parametrize("name", RENDERABLE)
def test_podmonitor_shape(name: str) -> None:
    """The PodMonitor comes only from components/podmonitor, which an overlay names itself:
    base and the quickstart need no Prometheus Operator CRDs."""
    monitors = find_all(rendered(name), "PodMonitor")
    if name in ("base", "cpu-quickstart"):
        assert not monitors, f"{name} must not need the Prometheus Operator CRDs"
        return
    (monitor,) = monitors
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "podMetricsEndpoints", "namespaceSelector"}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        keys = {"port", "path", "interval", "scrapeTimeout", "scheme", "relabelings"}
        assert set(endpoint) <= keys
        # The alert rules group by the Job's name, as the Pushgateway's grouping key does.
        targets = {r["targetLabel"] for r in endpoint["relabelings"]}
        assert "spotlora_job" in targets


@pytest.mark.parametrize("name", RENDERABLE)
def test_pod_hardening(name: str) -> None:
    for spec in pod_templates(rendered(name)):
        assert spec["restartPolicy"] == "Never"
        assert spec["automountServiceAccountToken"] is False
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["runAsUser"] == 10001
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in all_containers(spec):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, container["name"]
            assert sc["readOnlyRootFilesystem"] is True, container["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
            assert sc.get("privileged", False) is False, container["name"]
            assert sc.get("runAsUser", 10001) == 10001, container["name"]
            assert "add" not in sc["capabilities"], container["name"]
            resources = container["resources"]
            for key in ("cpu", "memory", "ephemeral-storage"):
                assert key in resources["requests"] and key in resources["limits"], (
                    f"{name}/{container['name']}: {key} request and limit"
                )
        for volume in spec["volumes"]:
            kinds = set(volume) - {"name"}
            assert kinds <= {"emptyDir", "configMap", "secret", "projected"}, volume
            assert "hostPath" not in volume


@pytest.mark.parametrize("name", RENDERABLE)
def test_writable_paths_are_bounded_volumes(name: str) -> None:
    """readOnlyRootFilesystem: the cache and /tmp are emptyDirs with a size limit."""
    docs = rendered(name)
    spec = pod_spec(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in trainer(docs)["volumeMounts"]}
    for path in ("/var/cache/spotlora", "/tmp"):
        volume = volumes[mounts[path]["name"]]
        assert "sizeLimit" in volume["emptyDir"], f"{name}: {path} needs a sizeLimit"
    if name in GPU_OVERLAYS or name == "base":
        cache = volumes[mounts["/var/cache/spotlora"]["name"]]["emptyDir"]["sizeLimit"]
        assert cache == "40Gi", "sized for a 7B base model"


def test_base_image_is_untagged() -> None:
    for spec in pod_templates(rendered("base")):
        for container in all_containers(spec):
            assert container["image"] == "spotlora"


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_pins_the_image(name: str) -> None:
    for spec in pod_templates(rendered(name)):
        for container in all_containers(spec):
            image = container["image"]
            repository, _, tag = image.rpartition(":")
            assert repository and "/" not in tag, f"{name}: {image} has no tag"
            assert tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+.*", tag), image
            if name.startswith("eks"):
                assert re.match(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/", image), image
            if name.startswith("gke"):
                assert re.match(r"[a-z0-9-]+-docker\.pkg\.dev/", image), image


@pytest.mark.parametrize("name", GPU_OVERLAYS)
def test_gpu_overlays_request_one_gpu_on_the_spot_pool(name: str) -> None:
    docs = rendered(name)
    resources = trainer(docs)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == 1
    assert resources["limits"]["nvidia.com/gpu"] == 1
    spec = pod_spec(docs)
    assert spec["nodeSelector"], f"{name} must pin the T4 spot pool"
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_gke_overlay_selects_t4_spot_nodes() -> None:
    spec = pod_spec(rendered("gke-t4"))
    assert spec["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
        "cloud.google.com/gke-spot": "true",
    }
    gke_gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    assert any(tolerates(t, gke_gpu_taint) for t in spec["tolerations"])


def test_cpu_quickstart_needs_no_gpu() -> None:
    docs = rendered("cpu-quickstart")
    text = str(docs)
    assert "nvidia.com/gpu" not in text
    spec = pod_spec(docs)
    assert "tolerations" not in spec and "nodeSelector" not in spec
    assert not find_all(docs, "CronJob")
    limits = trainer(docs)["resources"]["limits"]
    assert int(str(limits["cpu"])) <= 2, "the quickstart runs on a 2-core machine"


@pytest.mark.parametrize("name", RENDERABLE)
def test_service_account_and_namespace(name: str) -> None:
    docs = rendered(name)
    account = find(docs, "ServiceAccount", "spotlora")
    assert pod_spec(docs)["serviceAccountName"] == account["metadata"]["name"]
    if name != "base":
        namespace = find_all(docs, "Namespace")
        assert len(namespace) == 1
        assert namespace[0]["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
            "restricted"
        )
        for doc in docs:
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == namespace[0]["metadata"]["name"]
    annotations = account["metadata"].get("annotations", {})
    if name.startswith("eks"):
        assert annotations["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    if name.startswith("gke"):
        assert annotations["iam.gke.io/gcp-service-account"].endswith(".iam.gserviceaccount.com")


@pytest.mark.parametrize("name", RENDERABLE)
def test_kueue_queue_label_only_where_asked(name: str) -> None:
    docs = rendered(name)
    label = "kueue.x-k8s.io/queue-name"
    job_labels = job(docs)["metadata"]["labels"]
    cron_labels = [
        c["spec"]["jobTemplate"]["metadata"]["labels"] for c in find_all(docs, "CronJob")
    ]
    if name.endswith("-kueue"):
        assert job_labels[label]
        assert all(labels[label] == job_labels[label] for labels in cron_labels)
        assert job(docs)["spec"]["suspend"] is True, "Kueue admits a suspended Job"
    else:
        assert label not in job_labels
        assert all(label not in labels for labels in cron_labels)


@pytest.mark.parametrize("name", RENDERABLE)
def test_cronjob_scheduling_fields(name: str) -> None:
    for cron in find_all(rendered(name), "CronJob"):
        spec = cron["spec"]
        assert spec["concurrencyPolicy"] == "Forbid"
        assert spec["timeZone"]
        assert spec["startingDeadlineSeconds"] > 0
        assert spec["successfulJobsHistoryLimit"] >= 1
        assert spec["failedJobsHistoryLimit"] >= 1


def test_trainer_container_name_is_stable() -> None:
    """podFailurePolicy's onExitCodes names the container; renaming it silently disables it."""
    assert trainer(rendered("base"))["name"] == TRAINER
