variable "mode" {
  description = "How the pod gets the role: \"irsa\" (annotate the service account with role_arn, as k8s/overlays/eks-t4 does) or \"pod_identity\" (an EKS Pod Identity association; needs the eks-pod-identity-agent add-on)."
  type        = string
  default     = "irsa"

  validation {
    condition     = contains(["irsa", "pod_identity"], var.mode)
    error_message = "mode must be \"irsa\" or \"pod_identity\"."
  }
}

variable "role_name" {
  description = "IAM role name; the eks-t4 overlay's eks.amazonaws.com/role-arn annotation ends in it."
  type        = string
  default     = "spotlora-job"
}

variable "cluster_name" {
  description = "EKS cluster name (for the Pod Identity association)."
  type        = string
}

variable "oidc_provider_arn" {
  description = "ARN of the cluster's IAM OIDC provider; required when mode is \"irsa\"."
  type        = string
  default     = null
}

variable "namespace" {
  description = "Kubernetes namespace of the trainer's service account (the overlays use spotlora)."
  type        = string
  default     = "spotlora"
}

variable "service_account" {
  description = "Kubernetes service account of the trainer (k8s/base/serviceaccount.yaml)."
  type        = string
  default     = "spotlora"
}

variable "bucket_name" {
  description = "Bucket the trainer reads from and writes to."
  type        = string
}

variable "read_prefixes" {
  description = "Key prefixes the trainer may only read (base models, training data). Each ends in '/' or is a file-name prefix."
  type        = list(string)
  default     = ["models/", "data/"]

  validation {
    condition     = alltrue([for p in var.read_prefixes : length(p) > 0 && !startswith(p, "/")])
    error_message = "read_prefixes must be non-empty key prefixes without a leading '/'."
  }
}

variable "write_prefixes" {
  description = "Key prefixes the trainer may read, write and delete under (job outputs, checkpoints)."
  type        = list(string)
  default     = ["jobs/", "checkpoints/"]

  validation {
    condition     = length(var.write_prefixes) > 0 && alltrue([for p in var.write_prefixes : length(p) > 0 && !startswith(p, "/")])
    error_message = "write_prefixes must list at least one non-empty key prefix without a leading '/' (an empty prefix would open the whole bucket)."
  }
}

variable "kms_key_arn" {
  description = "Customer managed KMS key of the bucket, if any; null when the bucket uses the AWS managed key."
  type        = string
  default     = null
}

variable "tags" {
  description = "Tags for every resource in this module."
  type        = map(string)
  default     = {}
}
