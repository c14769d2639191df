variable "region" {
  description = "AWS region. Pick one with g4dn spot capacity in several zones."
  type        = string
  default     = "us-east-1"
}

variable "create_cluster" {
  description = "Create a new EKS cluster (VPC included); false reuses the cluster named cluster_name."
  type        = bool
  default     = true
}

variable "cluster_name" {
  description = "Name of the EKS cluster to create, or of the existing one to use."
  type        = string
  default     = "spotlora"
}

variable "kubernetes_version" {
  description = "Kubernetes minor version of a new cluster (1.31 or newer)."
  type        = string
  default     = "1.33"
}

variable "availability_zones" {
  description = "Zones for a new cluster's subnets; list every zone that offers g4dn. Ignored for an existing cluster."
  type        = list(string)
  default     = ["us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d"]
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach a new cluster's public API endpoint (your office or VPN); empty makes it private."
  type        = list(string)
}

variable "existing_node_subnet_ids" {
  description = "Private subnets for the T4 node group when create_cluster is false."
  type        = list(string)
  default     = []
}

variable "gpu_instance_types" {
  description = "Single-T4 spot instance types for the node group."
  type        = list(string)
  default     = ["g4dn.xlarge", "g4dn.2xlarge"]
}

variable "gpu_max_nodes" {
  description = "Most T4 nodes at once (the minimum is 0)."
  type        = number
  default     = 4
}

variable "multigpu_max_nodes" {
  description = "Most g4dn.12xlarge (4 x T4) spot nodes at once, for data-parallel jobs (k8s/overlays/eks-t4-multigpu). 0 creates no such node group."
  type        = number
  default     = 0

  validation {
    condition     = var.multigpu_max_nodes >= 0
    error_message = "multigpu_max_nodes must be 0 or more."
  }
}

variable "bucket_name" {
  description = "Globally unique name of the artifact bucket (s3://<bucket_name>/ in job files)."
  type        = string
}

variable "checkpoint_expiration_days" {
  description = "Days after which objects under checkpoints/ expire."
  type        = number
  default     = 14
}

variable "identity_mode" {
  description = "How the trainer pod gets its IAM role: \"irsa\" or \"pod_identity\"."
  type        = string
  default     = "irsa"
}

variable "namespace" {
  description = "Kubernetes namespace of the trainer (k8s/overlays/eks-t4 uses spotlora)."
  type        = string
  default     = "spotlora"
}

variable "ecr_repository_name" {
  description = "ECR repository for the trainer image."
  type        = string
  default     = "spotlora"
}

variable "tags" {
  description = "Tags added to every resource (provider default_tags)."
  type        = map(string)
  default     = {}
}
