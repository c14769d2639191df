variable "name" {
  description = "Cluster name (also names the VPC)."
  type        = string
  default     = "spotlora"
}

variable "kubernetes_version" {
  description = "EKS Kubernetes minor version. spotlora's manifests need at least 1.31 (podFailurePolicy GA)."
  type        = string
  default     = "1.33"

  validation {
    condition     = can(regex("^1\\.[0-9]+$", var.kubernetes_version)) && tonumber(split(".", var.kubernetes_version)[1]) >= 31
    error_message = "kubernetes_version must be 1.31 or newer (podFailurePolicy and podReplacementPolicy)."
  }
}

variable "vpc_cidr" {
  description = "VPC address range; private subnets are /20s carved from it, public ones /24s."
  type        = string
  default     = "10.42.0.0/16"
}

variable "availability_zones" {
  description = "Zones for the subnets. g4dn spot capacity differs per zone: list every zone of the region that offers g4dn."
  type        = list(string)

  validation {
    condition     = length(var.availability_zones) >= 2
    error_message = "EKS needs subnets in at least two availability zones."
  }
}

variable "endpoint_public_access_cidrs" {
  description = "CIDRs allowed to reach the public Kubernetes API endpoint; an empty list makes the endpoint private only."
  type        = list(string)
}

variable "tags" {
  description = "Tags for every resource in this module."
  type        = map(string)
  default     = {}
}

variable "system_instance_types" {
  description = "Instance types of the small on-demand node group that runs cluster add-ons and controllers."
  type        = list(string)
  default     = ["t3.medium"]
}
