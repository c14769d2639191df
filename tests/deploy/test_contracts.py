"""The contracts between the manifests, the service and the Terraform node group.

Each test names both sides: the service's exit codes (service/errors.py), the job file's
checkpoint grace budget, the metrics port, the node group's taint and label, and the Job /
CronJob pair that must not drift apart.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from deploy_support import (
    GPU_OVERLAYS,
    MIN_GRACE_MARGIN_SECONDS,
    RENDERABLE,
    REPO,
    SCALEOUT_OVERLAYS,
    TERRAFORM,
    TRAINER,
    find,
    find_all,
    job,
    job_file,
    pod_spec,
    rendered,
    tf_blocks,
    tf_locals,
    tf_variable_default,
    tolerates,
    trainer,
)

from service.errors import ExitCode

NODE_GROUP = TERRAFORM / "aws" / "modules" / "gpu-node-group"
JOB_IDENTITY = TERRAFORM / "aws" / "modules" / "job-identity"
DEFAULT_GRACE_SECONDS = 15  # CheckpointSpec.grace_period_seconds' default
DEFAULT_METRICS_PORT = 9090


def rules(docs: list[dict]) -> list[dict]:
    return job(docs)["spec"]["podFailurePolicy"]["rules"]


def exit_code_rules(docs: list[dict], action: str) -> set[int]:
    codes: set[int] = set()
    for rule in rules(docs):
        if rule["action"] == action and "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] == "In"
            assert rule["onExitCodes"]["containerName"] == TRAINER
            codes |= set(rule["onExitCodes"]["values"])
    return codes


@pytest.mark.parametrize("name", RENDERABLE)
def test_pod_failure_policy_matches_service_exit_codes(name: str) -> None:
    docs = rendered(name)
    assert exit_code_rules(docs, "FailJob") == {
        ExitCode.INVALID_INPUT,
        ExitCode.DATA_UNUSABLE,
        ExitCode.PUBLICATION_CONFLICT,
    }
    # Progress made, or the run carried on by a newer pod: never a failure.
    assert exit_code_rules(docs, "Ignore") == {ExitCode.PREEMPTED, ExitCode.SUPERSEDED}
    # No progress: counted, so a pod that keeps stopping early cannot churn forever.
    assert exit_code_rules(docs, "Count") == {ExitCode.PREEMPTED_NO_PROGRESS}
    every_code = {
        code
        for action in ("FailJob", "Count", "Ignore", "FailIndex")
        for code in exit_code_rules(docs, action)
    }
    assert every_code <= {int(code) for code in ExitCode}, "a rule names an unknown exit code"
    # Retried (counted by default): a bug, or a dependency that may come back.
    assert ExitCode.UNEXPECTED not in every_code
    assert ExitCode.DEPENDENCY_UNREACHABLE not in every_code
    disruption = [r for r in rules(docs) if "onPodConditions" in r]
    assert disruption == [
        {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        }
    ]


@pytest.mark.parametrize("name", RENDERABLE)
def test_job_retry_settings(name: str) -> None:
    spec = job(rendered(name))["spec"]
    assert spec["podReplacementPolicy"] == "Failed", "never two pods on one run"
    assert spec["activeDeadlineSeconds"] > 0
    minimum = 3 if name == "cpu-quickstart" else 10
    assert spec["backoffLimit"] >= minimum, "exit 76 is counted: the limit must be generous"


@pytest.mark.parametrize("name", RENDERABLE)
def test_termination_grace_covers_the_checkpoint_budget(name: str) -> None:
    docs = rendered(name)
    manifest = job_file(docs)
    grace = (
        manifest["spec"].get("checkpoint", {}).get("grace_period_seconds", DEFAULT_GRACE_SECONDS)
    )
    termination = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert termination >= grace + MIN_GRACE_MARGIN_SECONDS, (
        f"{name}: terminationGracePeriodSeconds {termination} < checkpoint grace {grace} "
        f"+ {MIN_GRACE_MARGIN_SECONDS} s margin"
    )


def test_eks_kubelet_shutdown_grace_leaves_the_pod_its_grace() -> None:
    """On a node shutdown the kubelet gives regular pods shutdownGracePeriod minus the
    critical pods' share, whatever terminationGracePeriodSeconds says."""
    total = tf_variable_default(NODE_GROUP, "shutdown_grace_period_seconds")
    critical = tf_variable_default(NODE_GROUP, "shutdown_grace_period_critical_pods_seconds")
    user_data = tf_locals(NODE_GROUP)["user_data"]
    assert "shutdownGracePeriod: ${var.shutdown_grace_period_seconds}s" in user_data
    assert (
        "shutdownGracePeriodCriticalPods: ${var.shutdown_grace_period_critical_pods_seconds}s"
        in user_data
    )
    assert "kind: NodeConfig" in user_data and "application/node.eks.aws" in user_data
    for name in ("eks-t4", "eks-t4-kueue"):
        termination = pod_spec(rendered(name))["terminationGracePeriodSeconds"]
        assert total - critical >= termination, (
            f"kubelet gives pods {total - critical} s on shutdown, {name} asks for {termination}"
        )


@pytest.mark.parametrize("name", RENDERABLE)
def test_metrics_port_matches_service_and_podmonitor(name: str) -> None:
    docs = rendered(name)
    ports = {p["name"]: p for p in trainer(docs)["ports"]}
    manifest_port = job_file(docs)["spec"].get("metrics", {}).get("port", DEFAULT_METRICS_PORT)
    assert ports["metrics"]["containerPort"] == manifest_port == DEFAULT_METRICS_PORT
    labels = job(docs)["spec"]["template"]["metadata"]["labels"]
    for monitor in find_all(docs, "PodMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), "PodMonitor does not select the trainer pod"
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]
    for policy in find_all(docs, "NetworkPolicy"):
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        allowed = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        assert allowed == ["metrics"]


@pytest.mark.parametrize("name", RENDERABLE)
def test_container_contract(name: str) -> None:
    """ENTRYPOINT ["spotlora"] in the image; the Job passes only args, and the env vars
    the service reads."""
    docs = rendered(name)
    container = trainer(docs)
    assert "command" not in container, "the image's ENTRYPOINT is the process (PID 1)"
    assert container["args"] == ["run", "--manifest", "/etc/spotlora/job.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SPOTLORA_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    )
    assert env["SPOTLORA_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    cache = env["SPOTLORA_CACHE_DIR"]["value"]
    assert cache == "/var/cache/spotlora" and cache in mounts
    assert env["HF_HOME"]["value"].startswith(cache + "/")
    assert env["TMPDIR"]["value"] == "/tmp" and "/tmp" in mounts
    assert env["HOME"]["value"] in mounts, "HOME must be writable on a read-only root"
    assert job_file(docs)["kind"] == "FineTuneJob"


@pytest.mark.parametrize("name", RENDERABLE)
def test_no_credentials_in_manifests(name: str) -> None:
    docs = rendered(name)
    forbidden = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}
    assert not find_all(docs, "Secret")
    for spec in [pod_spec(docs)]:
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for var in container.get("env", []):
                assert var["name"] not in forbidden or "valueFrom" in var, var["name"]


@pytest.mark.parametrize("name", [*RENDERABLE, *SCALEOUT_OVERLAYS])
def test_hub_token_comes_from_an_optional_secret(name: str) -> None:
    """HF_TOKEN from the Secret docs/deploy.md names, optional: a cluster without the Secret
    still runs public models, and the token is never written into a manifest."""
    docs = rendered(name)
    env = {e["name"]: e for e in trainer(docs)["env"]}
    assert env["HF_TOKEN"]["valueFrom"] == {
        "secretKeyRef": {"name": "spotlora-hf-token", "key": "token", "optional": True}
    }
    docs_text = (REPO / "docs" / "deploy.md").read_text()
    assert "secret generic spotlora-hf-token --from-literal=token=" in docs_text


@pytest.mark.parametrize("name", RENDERABLE)
def test_job_and_cronjob_pod_templates_agree(name: str) -> None:
    docs = rendered(name)
    crons = find_all(docs, "CronJob")
    if name == "cpu-quickstart":
        assert not crons
        return
    (cron,) = crons
    assert cron["spec"]["jobTemplate"]["spec"] == job(docs)["spec"]
    assert cron["spec"]["jobTemplate"]["metadata"]["labels"] == job(docs)["metadata"]["labels"]


def node_group_contract() -> tuple[dict[str, str], dict[str, str]]:
    values = tf_locals(NODE_GROUP)
    effects = {
        "NO_SCHEDULE": "NoSchedule",
        "NO_EXECUTE": "NoExecute",
        "PREFER_NO_SCHEDULE": "PreferNoSchedule",
    }
    taint = dict(values["node_taint"])
    taint["effect"] = effects[taint["effect"]]
    return values["node_labels"], taint


@pytest.mark.parametrize("name", [n for n in GPU_OVERLAYS if n.startswith("eks")])
def test_eks_scheduling_matches_the_terraform_node_group(name: str) -> None:
    labels, taint = node_group_contract()
    node_group = tf_blocks(NODE_GROUP, "resource")["aws_eks_node_group.this"]
    assert node_group["labels"] == "${local.node_labels}"
    (taint_block,) = node_group["taint"]
    assert taint_block == {
        "key": "${local.node_taint.key}",
        "value": "${local.node_taint.value}",
        "effect": "${local.node_taint.effect}",
    }
    spec = pod_spec(rendered(name))
    assert spec["nodeSelector"].items() <= labels.items(), (
        f"{name} selects {spec['nodeSelector']}, the node group sets {labels}"
    )
    assert any(tolerates(t, taint) for t in spec["tolerations"]), (
        f"{name} does not tolerate the node group's taint {taint}"
    )


def test_cluster_autoscaler_template_knows_label_taint_and_gpu() -> None:
    expression = tf_locals(NODE_GROUP)["autoscaler_tags"]
    labels, taint = node_group_contract()
    assert "node-template/label/${key}" in expression and "local.node_labels" in expression
    assert "node-template/taint/${local.node_taint.key}" in expression
    assert "${local.node_taint.value}:" + taint["effect"] in expression
    assert "node-template/resources/nvidia.com/gpu" in expression
    assert labels


def test_eks_service_account_matches_the_iam_role() -> None:
    docs = rendered("eks-t4")
    account = find(docs, "ServiceAccount", "spotlora")
    role_arn = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role_arn.rsplit("/", 1)[1] == tf_variable_default(JOB_IDENTITY, "role_name")
    assert account["metadata"]["namespace"] == tf_variable_default(JOB_IDENTITY, "namespace")
    assert account["metadata"]["name"] == tf_variable_default(JOB_IDENTITY, "service_account")


@pytest.mark.parametrize("name", RENDERABLE)
def test_job_file_storage_fits_the_bucket_layout(name: str) -> None:
    """Checkpoints expire only under the bucket's checkpoint prefix, and the job role may
    write only under its write prefixes."""
    spec = job_file(rendered(name))["spec"]
    if not spec["output"]["uri"].startswith("s3://"):
        return
    bucket_dir = TERRAFORM / "aws" / "modules" / "artifact-bucket"
    checkpoint_prefix = tf_variable_default(bucket_dir, "checkpoint_prefix")
    writable = tf_variable_default(JOB_IDENTITY, "write_prefixes")
    readable = tf_variable_default(JOB_IDENTITY, "read_prefixes") + writable

    def key(uri: str) -> str:
        match = re.fullmatch(r"s3://[^/]+/(.*)", uri)
        assert match, uri
        return match.group(1)

    checkpoint_uri = spec["checkpoint"]["uri"]
    assert key(checkpoint_uri).startswith(checkpoint_prefix)
    assert any(key(spec["output"]["uri"]).startswith(p) for p in writable)
    assert any(key(checkpoint_uri).startswith(p) for p in writable)
    for uri in (spec["model"]["source"], spec["data"]["train"]):
        if uri.startswith("s3://"):
            assert any(key(uri).startswith(p) for p in readable), uri


def test_gke_scheduling_matches_the_terraform_node_pool() -> None:
    gcp = TERRAFORM / "gcp"
    accelerator = tf_locals(gcp)["accelerator_type"]
    pool = tf_blocks(gcp, "resource")["google_container_node_pool.t4_spot"]
    assert pool["node_config"][0]["spot"] is True
    selector = pod_spec(rendered("gke-t4"))["nodeSelector"]
    assert selector["cloud.google.com/gke-accelerator"] == accelerator
    assert selector["cloud.google.com/gke-spot"] == "true"


def test_gke_service_account_matches_the_google_service_account() -> None:
    gcp = TERRAFORM / "gcp"
    account = find(rendered("gke-t4"), "ServiceAccount", "spotlora")
    email = account["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert email.split("@")[0] == tf_variable_default(gcp, "job_service_account_id")
    assert account["metadata"]["namespace"] == tf_variable_default(gcp, "namespace")


@pytest.mark.parametrize("name", RENDERABLE)
def test_every_job_gets_the_price_table_it_is_pointed_at(name: str, tmp_path: Path) -> None:
    """The cost ledger's prices: a ConfigMap the trainer reads at SPOTLORA_PRICE_TABLE, in the
    ledger's own format, naming the instance types the Terraform node groups create."""
    from service.ledger import load_price_table, price_from_table

    docs = rendered(name)
    env = {e["name"]: e for e in trainer(docs)["env"]}
    table_path = Path(env["SPOTLORA_PRICE_TABLE"]["value"])
    mounts = {m["name"]: m["mountPath"] for m in trainer(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    assert mounts["prices"] == str(table_path.parent)
    config_map = next(
        d
        for d in docs
        if d["kind"] == "ConfigMap"
        and d["metadata"]["name"] == volumes["prices"]["configMap"]["name"]
    )
    (tmp_path / "prices.yaml").write_text(config_map["data"][table_path.name])
    table = load_price_table(tmp_path / "prices.yaml")
    for instance in ("g4dn.xlarge", "g4dn.2xlarge", "g4dn.12xlarge"):  # terraform/aws
        assert price_from_table(table, instance).gpu_hour_usd, instance
    if "SPOTLORA_INSTANCE_TYPE" in env:  # an overlay that names its nodes' type must price it
        assert price_from_table(table, env["SPOTLORA_INSTANCE_TYPE"]["value"]).gpu_hour_usd
