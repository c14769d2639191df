# spotlora on AWS: everything the k8s/overlays/eks-t4 Job needs.
#
#   cluster (new, or an existing one)  ->  T4 spot node group (scale from zero)
#   S3 bucket (models, data, outputs, checkpoints)
#   IAM role for the trainer's service account (IRSA or Pod Identity)
#   ECR repository for the image

module "cluster" {
  source = "./modules/eks-cluster"
  count  = var.create_cluster ? 1 : 0

  name                         = var.cluster_name
  kubernetes_version           = var.kubernetes_version
  availability_zones           = var.availability_zones
  endpoint_public_access_cidrs = var.endpoint_public_access_cidrs
}

data "aws_eks_cluster" "existing" {
  count = var.create_cluster ? 0 : 1

  name = var.cluster_name
}

data "aws_iam_openid_connect_provider" "existing" {
  count = !var.create_cluster && var.identity_mode == "irsa" ? 1 : 0

  url = data.aws_eks_cluster.existing[0].identity[0].oidc[0].issuer
}

locals {
  cluster_name = var.create_cluster ? module.cluster[0].cluster_name : data.aws_eks_cluster.existing[0].name
  node_subnets = var.create_cluster ? module.cluster[0].private_subnet_ids : var.existing_node_subnet_ids

  oidc_provider_arn = (
    var.identity_mode != "irsa" ? null :
    var.create_cluster ? module.cluster[0].oidc_provider_arn :
    data.aws_iam_openid_connect_provider.existing[0].arn
  )
}

module "t4_spot" {
  source = "./modules/gpu-node-group"

  cluster_name   = local.cluster_name
  subnet_ids     = local.node_subnets
  instance_types = var.gpu_instance_types
  max_size       = var.gpu_max_nodes
}

# 4 x T4 nodes for the eks-t4-multigpu overlay; none unless asked for.
module "t4x4_spot" {
  source = "./modules/gpu-node-group"
  count  = var.multigpu_max_nodes > 0 ? 1 : 0

  name           = "t4x4-spot"
  cluster_name   = local.cluster_name
  subnet_ids     = local.node_subnets
  instance_types = ["g4dn.12xlarge"]
  gpus_per_node  = 4
  max_size       = var.multigpu_max_nodes
}

module "bucket" {
  source = "./modules/artifact-bucket"

  bucket_name                = var.bucket_name
  checkpoint_expiration_days = var.checkpoint_expiration_days
}

module "job_identity" {
  source = "./modules/job-identity"

  mode              = var.identity_mode
  cluster_name      = local.cluster_name
  oidc_provider_arn = local.oidc_provider_arn
  namespace         = var.namespace
  bucket_name       = module.bucket.bucket_name
}

module "ecr" {
  source = "./modules/ecr-repository"

  name = var.ecr_repository_name
}
