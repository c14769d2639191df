variable "name" {
  description = "Repository name; the image URL is <account>.dkr.ecr.<region>.amazonaws.com/<name>."
  type        = string
  default     = "spotlora"
}

variable "kms_key_arn" {
  description = "Customer managed KMS key for image encryption; null uses the AWS managed key aws/ecr."
  type        = string
  default     = null
}

variable "force_delete" {
  description = "Let terraform destroy delete the repository while it still holds images."
  type        = bool
  default     = false
}

variable "untagged_image_expiration_days" {
  description = "Days after which untagged images are expired."
  type        = number
  default     = 14

  validation {
    condition     = var.untagged_image_expiration_days >= 1
    error_message = "untagged_image_expiration_days must be at least 1."
  }
}

variable "max_image_count" {
  description = "Most images kept; older ones are expired first. Keep it above the number of tags your overlays may still pin."
  type        = number
  default     = 50

  validation {
    condition     = var.max_image_count >= 1
    error_message = "max_image_count must be at least 1."
  }
}

variable "tags" {
  description = "Tags for every resource in this module."
  type        = map(string)
  default     = {}
}
