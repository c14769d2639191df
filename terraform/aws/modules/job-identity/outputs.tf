output "role_arn" {
  description = "Role ARN: the eks.amazonaws.com/role-arn annotation of the spotlora service account (IRSA mode)."
  value       = aws_iam_role.this.arn
}

output "role_name" {
  description = "Role name."
  value       = aws_iam_role.this.name
}

output "service_account_annotations" {
  description = "Annotations for the Kubernetes service account (empty for Pod Identity)."
  value       = var.mode == "irsa" ? { "eks.amazonaws.com/role-arn" = aws_iam_role.this.arn } : {}
}
