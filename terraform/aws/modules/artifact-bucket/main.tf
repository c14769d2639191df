# Object storage for one or more spotlora deployments: base models (models/),
# training data (data/), job outputs (jobs/: adapter/ and run.json) and
# checkpoints (checkpoints/). Checkpoints are the only churn: they are written
# every few minutes and only the newest committed ones matter, so a lifecycle
# rule expires them; everything else is kept, with old versions pruned.

resource "aws_s3_bucket" "this" {
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles the cost of multi-GB checkpoints that are disposable; outputs can be replicated by a caller-owned rule if needed.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events; the Job's exit code and metrics report completion.
  #checkov:skip=CKV_AWS_18:Access logging needs a separate log bucket the caller owns; pass one via access_log_bucket (server access logs) or use CloudTrail data events.

  bucket        = var.bucket_name
  force_destroy = var.force_destroy

  tags = var.tags
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket = aws_s3_bucket.this.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

# Versioning protects outputs against an overwrite by a later run with the same
# output URI; the lifecycle below keeps the old versions from piling up.
resource "aws_s3_bucket_versioning" "this" {
  bucket = aws_s3_bucket.this.id

  versioning_configuration {
    status = "Enabled"
  }
}

# SSE-KMS with the AWS managed key (aws/s3) unless a customer key is given; the
# bucket key cuts KMS requests for the many small checkpoint files.
resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "this" {
  count = var.access_log_bucket == null ? 0 : 1

  bucket        = aws_s3_bucket.this.id
  target_bucket = var.access_log_bucket
  target_prefix = "s3-access/${var.bucket_name}/"
}

data "aws_iam_policy_document" "bucket" {
  statement {
    sid     = "DenyInsecureTransport"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  statement {
    sid     = "DenyOutdatedTLS"
    effect  = "Deny"
    actions = ["s3:*"]
    resources = [
      aws_s3_bucket.this.arn,
      "${aws_s3_bucket.this.arn}/*",
    ]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = aws_s3_bucket.this.id
  policy = data.aws_iam_policy_document.bucket.json

  # A policy applied before the public access block could be judged public.
  depends_on = [aws_s3_bucket_public_access_block.this]
}

resource "aws_s3_bucket_lifecycle_configuration" "this" {
  bucket = aws_s3_bucket.this.id

  # Checkpoints of finished or abandoned runs. A run lives at most a day
  # (the Job's activeDeadlineSeconds), and its checkpoint manager already keeps
  # only the newest few, so anything this old is dead weight.
  rule {
    id     = "expire-old-checkpoints"
    status = "Enabled"

    filter {
      prefix = var.checkpoint_prefix
    }

    expiration {
      days = var.checkpoint_expiration_days
    }

    noncurrent_version_expiration {
      noncurrent_days = 1
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # Everything else: prune old versions, delete markers left alone, and uploads
  # a preempted pod never completed.
  rule {
    id     = "prune-noncurrent-versions"
    status = "Enabled"

    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_expiration_days
    }

    expiration {
      expired_object_delete_marker = true
    }

    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  # Lifecycle rules on a versioned bucket need versioning in place first.
  depends_on = [aws_s3_bucket_versioning.this]
}
