# The AWS identity of the trainer pod (Kubernetes service account
# <namespace>/<service_account>), through IRSA or EKS Pod Identity. It may read
# models and data, and read/write only the output and checkpoint prefixes; it
# has no other AWS permission (image pulls use the node role).

locals {
  bucket_arn = "arn:${data.aws_partition.current.partition}:s3:::${var.bucket_name}"

  read_prefixes   = distinct(concat(var.read_prefixes, var.write_prefixes))
  read_objects    = [for p in local.read_prefixes : "${local.bucket_arn}/${p}*"]
  write_objects   = [for p in var.write_prefixes : "${local.bucket_arn}/${p}*"]
  list_patterns   = flatten([for p in local.read_prefixes : [p, "${p}*"]])
  oidc_issuer     = var.oidc_provider_arn == null ? "" : element(split("oidc-provider/", var.oidc_provider_arn), 1)
  service_subject = "system:serviceaccount:${var.namespace}:${var.service_account}"
}

data "aws_partition" "current" {}

data "aws_iam_policy_document" "trust" {
  dynamic "statement" {
    for_each = var.mode == "irsa" ? [1] : []

    content {
      sid     = "IRSA"
      actions = ["sts:AssumeRoleWithWebIdentity"]

      principals {
        type        = "Federated"
        identifiers = [var.oidc_provider_arn]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:sub"
        values   = [local.service_subject]
      }

      condition {
        test     = "StringEquals"
        variable = "${local.oidc_issuer}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }

  dynamic "statement" {
    for_each = var.mode == "pod_identity" ? [1] : []

    content {
      sid     = "EKSPodIdentity"
      actions = ["sts:AssumeRole", "sts:TagSession"]

      principals {
        type        = "Service"
        identifiers = ["pods.eks.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_role" "this" {
  name                 = var.role_name
  description          = "spotlora trainer (${local.service_subject})"
  assume_role_policy   = data.aws_iam_policy_document.trust.json
  max_session_duration = 3600

  tags = var.tags
}

data "aws_iam_policy_document" "storage" {
  # Listing is limited to the job's prefixes: the checkpoint manager lists a
  # run's checkpoints, storage lists a model prefix to download it.
  statement {
    sid       = "ListJobPrefixes"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = local.list_patterns
    }
  }

  statement {
    sid       = "ReadModelsDataAndOwnOutputs"
    actions   = ["s3:GetObject"]
    resources = local.read_objects
  }

  # Delete: checkpoint retention (keep N) removes older checkpoints.
  # Multipart: checkpoints and adapters are uploaded in parts.
  statement {
    sid = "WriteOutputsAndCheckpoints"
    actions = [
      "s3:PutObject",
      "s3:DeleteObject",
      "s3:AbortMultipartUpload",
      "s3:ListMultipartUploadParts",
    ]
    resources = local.write_objects
  }

  dynamic "statement" {
    for_each = var.kms_key_arn == null ? [] : [1]

    content {
      sid       = "UseBucketKey"
      actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
      resources = [var.kms_key_arn]
    }
  }
}

resource "aws_iam_role_policy" "storage" {
  name   = "spotlora-storage"
  role   = aws_iam_role.this.id
  policy = data.aws_iam_policy_document.storage.json
}

resource "aws_eks_pod_identity_association" "this" {
  count = var.mode == "pod_identity" ? 1 : 0

  cluster_name    = var.cluster_name
  namespace       = var.namespace
  service_account = var.service_account
  role_arn        = aws_iam_role.this.arn

  tags = var.tags
}
