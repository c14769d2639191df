"""Static checks of terraform/: it parses, follows the module conventions, and keeps the
security and cost invariants of the deployment (no terraform binary needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from deploy_support import (
    TERRAFORM,
    load_tools_module,
    parse_tf,
    tf_blocks,
    tf_files,
    tf_locals,
    tf_module_dirs,
    tf_variable_default,
)

AWS = TERRAFORM / "aws"
GCP = TERRAFORM / "gcp"
MODULES = AWS / "modules"
MODULE_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf", "README.md")


def rel(path: Path) -> str:
    return str(path.relative_to(TERRAFORM))


def resource(module: str, address: str) -> dict[str, Any]:
    return tf_blocks(MODULES / module, "resource")[address]


def test_there_is_terraform_to_check() -> None:
    assert len(tf_files()) >= 20
    assert {p.name for p in MODULES.iterdir()} >= {
        "eks-cluster",
        "gpu-node-group",
        "artifact-bucket",
        "job-identity",
        "ecr-repository",
    }


@pytest.mark.parametrize("path", tf_files(), ids=rel)
def test_parses(path: Path) -> None:
    assert isinstance(parse_tf(path), dict)


@pytest.mark.parametrize("path", tf_files(), ids=rel)
def test_terraform_fmt_style(path: Path) -> None:
    problems = load_tools_module("tf_style").check(path.read_text(), rel(path))
    assert not problems, "\n".join(problems) + "\nfix: python tools/tf_style.py --write terraform"


@pytest.mark.parametrize("module_dir", tf_module_dirs(), ids=rel)
def test_module_layout(module_dir: Path) -> None:
    missing = [name for name in MODULE_FILES if not (module_dir / name).is_file()]
    assert not missing, f"{rel(module_dir)} lacks {missing}"


@pytest.mark.parametrize("module_dir", tf_module_dirs(), ids=rel)
def test_every_variable_typed_and_described(module_dir: Path) -> None:
    for name, body in tf_blocks(module_dir, "variable").items():
        assert body.get("type"), f"{rel(module_dir)}: variable {name} has no type"
        assert str(body.get("description", "")).strip(), f"variable {name} has no description"


@pytest.mark.parametrize("module_dir", tf_module_dirs(), ids=rel)
def test_every_output_described(module_dir: Path) -> None:
    for name, body in tf_blocks(module_dir, "output").items():
        assert str(body.get("description", "")).strip(), f"output {name} has no description"


@pytest.mark.parametrize("module_dir", tf_module_dirs(), ids=rel)
def test_registry_modules_pinned_exactly(module_dir: Path) -> None:
    for name, body in tf_blocks(module_dir, "module").items():
        source = body["source"]
        if source.startswith(("./", "../")):
            assert "version" not in body, f"local module {name} cannot take a version"
            assert (module_dir / source).resolve().is_dir(), f"module {name}: {source} missing"
            continue
        version = body.get("version", "")
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), (
            f"{rel(module_dir)}: module {name} ({source}) must pin an exact version, "
            f"has {version!r}"
        )


@pytest.mark.parametrize("module_dir", tf_module_dirs(), ids=rel)
def test_provider_requirements(module_dir: Path) -> None:
    (terraform,) = parse_tf(module_dir / "versions.tf")["terraform"]
    assert terraform["required_version"].startswith(">=")
    (providers,) = terraform["required_providers"]
    cloud = module_dir.relative_to(TERRAFORM).parts[0]
    expected = {
        "aws": {"aws": {"source": "hashicorp/aws", "version": ">= 6.0, < 7.0"}},
        "gcp": {"google": {"source": "hashicorp/google", "version": ">= 6.0, < 8.0"}},
    }[cloud]
    assert providers == expected


def test_root_module_uses_every_local_module() -> None:
    used = {body["source"] for body in tf_blocks(AWS, "module").values()}
    assert used == {f"./modules/{p.name}" for p in MODULES.iterdir() if p.is_dir()}


# --- S3 -------------------------------------------------------------------------------


def test_bucket_blocks_public_access() -> None:
    block = resource("artifact-bucket", "aws_s3_bucket_public_access_block.this")
    for setting in (
        "block_public_acls",
        "block_public_policy",
        "ignore_public_acls",
        "restrict_public_buckets",
    ):
        assert block[setting] is True, setting
    ownership = resource("artifact-bucket", "aws_s3_bucket_ownership_controls.this")
    assert ownership["rule"][0]["object_ownership"] == "BucketOwnerEnforced"


def test_bucket_versioned_and_encrypted() -> None:
    versioning = resource("artifact-bucket", "aws_s3_bucket_versioning.this")
    assert versioning["versioning_configuration"][0]["status"] == "Enabled"
    sse = resource("artifact-bucket", "aws_s3_bucket_server_side_encryption_configuration.this")
    (rule,) = sse["rule"]
    assert rule["apply_server_side_encryption_by_default"][0]["sse_algorithm"] in (
        "aws:kms",
        "AES256",
    )


def test_bucket_policy_denies_plain_http() -> None:
    document = tf_blocks(MODULES / "artifact-bucket", "data")["aws_iam_policy_document.bucket"]
    tls = [
        s
        for s in document["statement"]
        if s["effect"] == "Deny"
        and any(
            c["variable"] == "aws:SecureTransport" and c["values"] == ["false"]
            for c in s.get("condition", [])
        )
    ]
    assert len(tls) == 1
    (statement,) = tls
    assert statement["actions"] == ["s3:*"]
    assert statement["principals"][0]["identifiers"] == ["*"]
    assert set(statement["resources"]) == {
        "${aws_s3_bucket.this.arn}",
        "${aws_s3_bucket.this.arn}/*",
    }
    policy = resource("artifact-bucket", "aws_s3_bucket_policy.this")
    assert policy["policy"] == "${data.aws_iam_policy_document.bucket.json}"


def test_bucket_lifecycle_expires_checkpoints_and_old_versions() -> None:
    lifecycle = resource("artifact-bucket", "aws_s3_bucket_lifecycle_configuration.this")
    rules = {r["id"]: r for r in lifecycle["rule"]}
    assert all(r["status"] == "Enabled" for r in rules.values())
    checkpoints = rules["expire-old-checkpoints"]
    assert checkpoints["filter"][0]["prefix"] == "${var.checkpoint_prefix}"
    assert checkpoints["expiration"][0]["days"] == "${var.checkpoint_expiration_days}"
    assert "noncurrent_version_expiration" in checkpoints
    everything = rules["prune-noncurrent-versions"]
    assert everything["noncurrent_version_expiration"][0]["noncurrent_days"] == (
        "${var.noncurrent_version_expiration_days}"
    )
    for rule in rules.values():
        assert rule["abort_incomplete_multipart_upload"][0]["days_after_initiation"] >= 1
    bucket_dir = MODULES / "artifact-bucket"
    assert tf_variable_default(bucket_dir, "checkpoint_prefix") == "checkpoints/"
    # A run lasts at most a day (activeDeadlineSeconds 86400): never expire a live run.
    assert tf_variable_default(bucket_dir, "checkpoint_expiration_days") >= 2


# --- ECR ------------------------------------------------------------------------------


def test_ecr_immutable_and_scanned() -> None:
    repo = resource("ecr-repository", "aws_ecr_repository.this")
    assert repo["image_tag_mutability"] == "IMMUTABLE"
    assert repo["image_scanning_configuration"][0]["scan_on_push"] is True
    assert repo["encryption_configuration"][0]["encryption_type"] == "KMS"


# --- GPU node group -------------------------------------------------------------------


def test_node_group_is_t4_spot_scaling_from_zero() -> None:
    group = resource("gpu-node-group", "aws_eks_node_group.this")
    assert group["capacity_type"] == "SPOT"
    assert group["ami_type"] == "AL2023_x86_64_NVIDIA"
    (scaling,) = group["scaling_config"]
    assert scaling["min_size"] == 0
    assert scaling["desired_size"] == 0
    assert "${scaling_config[0].desired_size}" in group["lifecycle"][0]["ignore_changes"]
    types = tf_variable_default(MODULES / "gpu-node-group", "instance_types")
    assert types and all(t.startswith("g4dn.") for t in types)
    assert group["launch_template"][0]["id"] == "${aws_launch_template.this.id}"


def test_launch_template_disk_and_imds() -> None:
    template = resource("gpu-node-group", "aws_launch_template.this")
    (ebs,) = template["block_device_mappings"][0]["ebs"]
    assert ebs["encrypted"] is True
    assert ebs["volume_size"] == "${var.disk_size_gib}"
    assert tf_variable_default(MODULES / "gpu-node-group", "disk_size_gib") >= 100
    (metadata,) = template["metadata_options"]
    assert metadata["http_tokens"] == "required"
    assert template["user_data"] == "${base64encode(local.user_data)}"


def test_node_user_data_is_a_nodeadm_mime_document() -> None:
    user_data = tf_locals(MODULES / "gpu-node-group")["user_data"]
    assert user_data.startswith("MIME-Version: 1.0")
    assert "Content-Type: application/node.eks.aws" in user_data
    assert "apiVersion: node.eks.aws/v1alpha1" in user_data
    assert user_data.rstrip().endswith("--//--")


def test_autoscaler_tags_target_the_node_groups_asg() -> None:
    tag = resource("gpu-node-group", "aws_autoscaling_group_tag.cluster_autoscaler")
    assert tag["for_each"] == "${local.autoscaler_tags}"
    assert "autoscaling_groups[0].name" in tag["autoscaling_group_name"]


# --- IAM --------------------------------------------------------------------------------


def test_job_role_is_least_privilege() -> None:
    document = tf_blocks(MODULES / "job-identity", "data")["aws_iam_policy_document.storage"]
    statements = document["statement"]
    actions = [a for s in statements for a in s["actions"]]
    assert all("*" not in a for a in actions), actions
    assert not any(a.startswith(("iam:", "ecr:", "eks:", "ec2:")) for a in actions)
    for statement in statements:
        resources = statement["resources"]
        assert resources != ["*"] and "*" not in resources
    listing = next(s for s in statements if s["actions"] == ["s3:ListBucket"])
    assert listing["condition"][0]["variable"] == "s3:prefix"
    writes = next(s for s in statements if "s3:PutObject" in s["actions"])
    assert writes["resources"] == "${local.write_objects}"
    identity = MODULES / "job-identity"
    assert tf_variable_default(identity, "write_prefixes") == ["jobs/", "checkpoints/"]


def test_job_role_trust_is_bound_to_the_service_account() -> None:
    trust = tf_blocks(MODULES / "job-identity", "data")["aws_iam_policy_document.trust"]
    text = json.dumps(trust)
    assert "sts:AssumeRoleWithWebIdentity" in text and ":sub" in text and ":aud" in text
    assert "local.service_subject" in text
    assert "pods.eks.amazonaws.com" in text and "sts:TagSession" in text
    subject = tf_locals(MODULES / "job-identity")["service_subject"]
    assert subject == "system:serviceaccount:${var.namespace}:${var.service_account}"
    association = resource("job-identity", "aws_eks_pod_identity_association.this")
    assert association["service_account"] == "${var.service_account}"


# --- GCP --------------------------------------------------------------------------------


def gcp_resource(address: str) -> dict[str, Any]:
    return tf_blocks(GCP, "resource")[address]


def test_gke_node_pool_is_t4_spot_scaling_from_zero() -> None:
    pool = gcp_resource("google_container_node_pool.t4_spot")
    (autoscaling,) = pool["autoscaling"]
    assert autoscaling["total_min_node_count"] == 0
    (config,) = pool["node_config"]
    assert config["spot"] is True
    (accelerator,) = config["guest_accelerator"]
    assert accelerator["type"] == "${local.accelerator_type}"
    assert accelerator["count"] == 1
    assert config["workload_metadata_config"][0]["mode"] == "GKE_METADATA"


def test_gcs_bucket_invariants() -> None:
    bucket = gcp_resource("google_storage_bucket.artifacts")
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    conditions = [rule["condition"][0] for rule in bucket["lifecycle_rule"]]
    assert any(c.get("matches_prefix") == ["checkpoints/"] for c in conditions)
    assert any("days_since_noncurrent_time" in c for c in conditions)


def test_gke_trainer_identity_is_bound_and_scoped() -> None:
    binding = gcp_resource("google_service_account_iam_member.workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    member = tf_locals(GCP)["workload_member"]
    assert member.endswith(".svc.id.goog[${var.namespace}/${var.service_account}]")
    write = gcp_resource("google_storage_bucket_iam_member.job_write")
    assert "startsWith" in write["condition"][0]["expression"]
    registry = gcp_resource("google_artifact_registry_repository.images")
    assert registry["docker_config"][0]["immutable_tags"] is True
