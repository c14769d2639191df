variable "bucket_name" {
  description = "Globally unique bucket name; job files address it as s3://<bucket_name>/."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name must be 3-63 lower-case letters, digits, '.' or '-'."
  }
}

variable "checkpoint_prefix" {
  description = "Key prefix that holds checkpoints (set the job file's spec.checkpoint.uri under it); the only prefix that expires."
  type        = string
  default     = "checkpoints/"

  validation {
    condition     = length(var.checkpoint_prefix) > 0 && endswith(var.checkpoint_prefix, "/")
    error_message = "checkpoint_prefix must be a non-empty prefix ending in '/', or the rule would expire the whole bucket."
  }
}

variable "checkpoint_expiration_days" {
  description = "Days after which checkpoint objects expire. Keep it longer than a run can last, preemptions included."
  type        = number
  default     = 14

  validation {
    condition     = var.checkpoint_expiration_days >= 2
    error_message = "checkpoint_expiration_days must be at least 2 (a run may last a day)."
  }
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which overwritten or deleted object versions outside the checkpoint prefix are removed."
  type        = number
  default     = 30

  validation {
    condition     = var.noncurrent_version_expiration_days >= 1
    error_message = "noncurrent_version_expiration_days must be at least 1."
  }
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for SSE-KMS; null uses the AWS managed key aws/s3."
  type        = string
  default     = null
}

variable "access_log_bucket" {
  description = "Existing bucket to receive S3 server access logs; null disables access logging."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let terraform destroy delete the bucket while it still holds objects (outputs included)."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for every resource in this module."
  type        = map(string)
  default     = {}
}
