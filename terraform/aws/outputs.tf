output "cluster_name" {
  description = "EKS cluster: aws eks update-kubeconfig --name <cluster_name>."
  value       = local.cluster_name
}

output "bucket_name" {
  description = "Artifact bucket: replace my-bucket in the job files with it."
  value       = module.bucket.bucket_name
}

output "job_role_arn" {
  description = "IAM role of the trainer: the eks.amazonaws.com/role-arn annotation in k8s/overlays/eks-t4 (IRSA)."
  value       = module.job_identity.role_arn
}

output "ecr_repository_url" {
  description = "Image repository: the newName of the images: entry in k8s/overlays/eks-t4."
  value       = module.ecr.repository_url
}

output "gpu_node_group_name" {
  description = "T4 spot node group."
  value       = module.t4_spot.node_group_name
}

output "gpu_autoscaling_group_names" {
  description = "Auto Scaling groups of the T4 node group (Cluster Autoscaler discovers them by tag)."
  value       = module.t4_spot.autoscaling_group_names
}
