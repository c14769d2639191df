output "cluster_name" {
  description = "EKS cluster name."
  value       = module.eks.cluster_name
}

output "cluster_endpoint" {
  description = "Kubernetes API endpoint."
  value       = module.eks.cluster_endpoint
}

output "cluster_certificate_authority_data" {
  description = "Base64 CA certificate of the API endpoint."
  value       = module.eks.cluster_certificate_authority_data
}

output "oidc_provider_arn" {
  description = "IAM OIDC provider of the cluster, for IRSA trust policies."
  value       = module.eks.oidc_provider_arn
}

output "private_subnet_ids" {
  description = "Private subnets, one per availability zone, for node groups."
  value       = module.vpc.private_subnets
}

output "vpc_id" {
  description = "VPC ID."
  value       = module.vpc.vpc_id
}
