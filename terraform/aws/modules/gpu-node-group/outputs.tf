output "node_group_name" {
  description = "Managed node group name."
  value       = aws_eks_node_group.this.node_group_name
}

output "node_role_arn" {
  description = "IAM role of the nodes."
  value       = aws_iam_role.node.arn
}

output "autoscaling_group_names" {
  description = "Auto Scaling groups behind the node group (for Cluster Autoscaler's auto-discovery)."
  value       = flatten([for r in aws_eks_node_group.this.resources : [for g in r.autoscaling_groups : g.name]])
}

output "node_labels" {
  description = "Labels every node carries: the eks-t4 overlay's nodeSelector."
  value       = local.node_labels
}

output "node_taint" {
  description = "Taint every node carries: the base Job's toleration."
  value       = local.node_taint
}
