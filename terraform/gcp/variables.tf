variable "project_id" {
  description = "Google Cloud project of the cluster, bucket and registry."
  type        = string
}

variable "region" {
  description = "Region of the Artifact Registry repository (and provider default)."
  type        = string
  default     = "us-central1"
}

variable "cluster_name" {
  description = "Existing GKE Standard cluster with Workload Identity enabled."
  type        = string
}

variable "location" {
  description = "Location (region or zone) of the cluster."
  type        = string
}

variable "node_locations" {
  description = "Zones for the T4 pool; null uses the cluster's. List zones that offer T4s: more zones, more spot capacity."
  type        = list(string)
  default     = null
}

variable "node_pool_name" {
  description = "Name of the T4 spot node pool."
  type        = string
  default     = "t4-spot"
}

variable "machine_type" {
  description = "N1 machine type for one T4 (4 vCPU / 15 GB fits the Job's 3 CPU / 12 GiB request)."
  type        = string
  default     = "n1-standard-4"

  validation {
    condition     = startswith(var.machine_type, "n1-")
    error_message = "T4 GPUs attach to N1 machine types only."
  }
}

variable "max_nodes" {
  description = "Most T4 nodes at once across zones (the minimum is 0)."
  type        = number
  default     = 4
}

variable "disk_size_gb" {
  description = "Boot disk per node: the image, and the trainer's 50 GiB of emptyDir volumes."
  type        = number
  default     = 150

  validation {
    condition     = var.disk_size_gb >= 100
    error_message = "disk_size_gb must be at least 100."
  }
}

variable "bucket_name" {
  description = "Globally unique GCS bucket name."
  type        = string
}

variable "bucket_location" {
  description = "Bucket location; the cluster's region keeps model downloads free of egress charges."
  type        = string
  default     = "US-CENTRAL1"
}

variable "checkpoint_expiration_days" {
  description = "Days after which objects under checkpoints/ are deleted."
  type        = number
  default     = 14
}

variable "noncurrent_version_expiration_days" {
  description = "Days after which noncurrent object versions are deleted."
  type        = number
  default     = 30
}

variable "kms_key_name" {
  description = "Cloud KMS key for the bucket's default encryption; null uses Google-managed keys."
  type        = string
  default     = null
}

variable "force_destroy" {
  description = "Let terraform destroy delete the bucket while it still holds objects."
  type        = bool
  default     = false
}

variable "namespace" {
  description = "Kubernetes namespace of the trainer (k8s/overlays/gke-t4 uses spotlora)."
  type        = string
  default     = "spotlora"
}

variable "service_account" {
  description = "Kubernetes service account of the trainer."
  type        = string
  default     = "spotlora"
}

variable "job_service_account_id" {
  description = "Account id of the trainer's Google service account (spotlora-job@PROJECT.iam.gserviceaccount.com)."
  type        = string
  default     = "spotlora-job"
}

variable "write_prefixes" {
  description = "Object prefixes the trainer may write and delete under."
  type        = list(string)
  default     = ["jobs/", "checkpoints/"]

  validation {
    condition     = length(var.write_prefixes) > 0 && alltrue([for p in var.write_prefixes : length(p) > 0])
    error_message = "write_prefixes must list at least one non-empty prefix."
  }
}

variable "repository_id" {
  description = "Artifact Registry repository id."
  type        = string
  default     = "spotlora"
}
