variable "name" {
  description = "Node group name (also the prefix of its launch template and node role)."
  type        = string
  default     = "t4-spot"
}

variable "cluster_name" {
  description = "EKS cluster the node group joins."
  type        = string
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of the nodes; null follows the cluster's version."
  type        = string
  default     = null
}

variable "subnet_ids" {
  description = "Private subnets for the nodes. More availability zones give spot more capacity pools to draw from."
  type        = list(string)

  validation {
    condition     = length(var.subnet_ids) > 0
    error_message = "subnet_ids must list at least one subnet."
  }
}

variable "instance_types" {
  description = "Spot instance types, each with gpus_per_node NVIDIA T4s. Several types widen the spot pools; all must fit the Job's requests (3 vCPU, 12 GiB per GPU)."
  type        = list(string)
  default     = ["g4dn.xlarge", "g4dn.2xlarge"]

  validation {
    condition     = length(var.instance_types) > 0 && alltrue([for t in var.instance_types : startswith(t, "g4dn.")])
    error_message = "instance_types must be g4dn types (NVIDIA T4)."
  }
}

variable "gpus_per_node" {
  description = "T4s on each instance type: 1 for g4dn.xlarge to g4dn.16xlarge, 4 for g4dn.12xlarge (the multi-GPU overlay), 8 for g4dn.metal. Tells the cluster autoscaler what a node from zero offers."
  type        = number
  default     = 1

  validation {
    condition     = contains([1, 4, 8], var.gpus_per_node)
    error_message = "gpus_per_node must be 1, 4 or 8 (the g4dn sizes)."
  }
}

variable "max_size" {
  description = "Most nodes at once, i.e. most trainer runs in parallel. The minimum is always 0: idle GPUs cost nothing."
  type        = number
  default     = 4

  validation {
    condition     = var.max_size >= 1
    error_message = "max_size must be at least 1."
  }
}

variable "disk_size_gib" {
  description = "Root volume per node: the image (~10 GB), the trainer's cache and /tmp emptyDirs (requests 50 GiB) and headroom."
  type        = number
  default     = 150

  validation {
    condition     = var.disk_size_gib >= 100
    error_message = "disk_size_gib must be at least 100: the Job requests 50 GiB of ephemeral storage on top of the images."
  }
}

variable "ebs_kms_key_arn" {
  description = "Customer managed KMS key for the root volumes; null uses the AWS managed key aws/ebs."
  type        = string
  default     = null
}

variable "imds_hop_limit" {
  description = "IMDSv2 response hop limit. 2 lets pods read the spot interruption notice (preemption.spot_notice: aws); 1 hides IMDS from pods."
  type        = number
  default     = 2

  validation {
    condition     = contains([1, 2], var.imds_hop_limit)
    error_message = "imds_hop_limit must be 1 or 2."
  }
}

variable "shutdown_grace_period_seconds" {
  description = "kubelet shutdownGracePeriod: how long a node shutdown is held for its pods. Regular pods get this minus the critical share; keep that at least the Job's terminationGracePeriodSeconds (120 in k8s/overlays/eks-t4)."
  type        = number
  default     = 150

  validation {
    condition     = var.shutdown_grace_period_seconds >= 30 && var.shutdown_grace_period_seconds <= 600
    error_message = "shutdown_grace_period_seconds must be between 30 and 600."
  }
}

variable "shutdown_grace_period_critical_pods_seconds" {
  description = "kubelet shutdownGracePeriodCriticalPods: the last part of the shutdown grace, reserved for system-critical pods (CNI, logging)."
  type        = number
  default     = 30

  validation {
    condition     = var.shutdown_grace_period_critical_pods_seconds >= 10
    error_message = "shutdown_grace_period_critical_pods_seconds must be at least 10."
  }
}

variable "tags" {
  description = "Tags for every resource in this module (and the instances and volumes it launches)."
  type        = map(string)
  default     = {}
}
