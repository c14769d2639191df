# A small EKS cluster for spotlora when there is none to reuse: a VPC with
# private subnets in every zone given (spot capacity varies per zone), one NAT
# gateway, an S3 gateway endpoint (model downloads and checkpoint uploads stay
# off the NAT), and a control plane with the add-ons the trainer needs
# (Pod Identity agent for pod credentials).

module "vpc" {
  #checkov:skip=CKV_TF_1:Terraform Registry module pinned to an exact release (version = "6.5.1"); the registry serves immutable release archives, a git commit hash does not apply to registry sources.
  source  = "terraform-aws-modules/vpc/aws"
  version = "6.5.1"

  name = var.name
  cidr = var.vpc_cidr
  azs  = var.availability_zones

  private_subnets = [for i, _ in var.availability_zones : cidrsubnet(var.vpc_cidr, 4, i)]
  public_subnets  = [for i, _ in var.availability_zones : cidrsubnet(var.vpc_cidr, 8, 48 + i)]

  # One NAT gateway: the cluster runs batch jobs, not a service whose egress
  # must survive a zone outage.
  enable_nat_gateway = true
  single_nat_gateway = true

  public_subnet_tags = {
    "kubernetes.io/role/elb" = "1"
  }

  private_subnet_tags = {
    "kubernetes.io/role/internal-elb" = "1"
  }

  tags = var.tags
}

resource "aws_vpc_endpoint" "s3" {
  vpc_id            = module.vpc.vpc_id
  service_name      = "com.amazonaws.${data.aws_region.current.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = module.vpc.private_route_table_ids

  tags = merge(var.tags, { Name = "${var.name}-s3" })
}

data "aws_region" "current" {}

module "eks" {
  #checkov:skip=CKV_TF_1:Terraform Registry module pinned to an exact release (version = "21.17.0"); the registry serves immutable release archives, a git commit hash does not apply to registry sources.
  source  = "terraform-aws-modules/eks/aws"
  version = "21.17.0"

  name               = var.name
  kubernetes_version = var.kubernetes_version

  vpc_id     = module.vpc.vpc_id
  subnet_ids = module.vpc.private_subnets

  endpoint_public_access       = length(var.endpoint_public_access_cidrs) > 0
  endpoint_public_access_cidrs = var.endpoint_public_access_cidrs

  # Whoever runs terraform apply can use kubectl right after.
  enable_cluster_creator_admin_permissions = true

  # IRSA needs the cluster's OIDC provider; Pod Identity needs the agent.
  enable_irsa = true

  addons = {
    coredns = {}
    eks-pod-identity-agent = {
      before_compute = true
    }
    kube-proxy = {}
    vpc-cni = {
      before_compute = true
    }
  }

  # CoreDNS and the controllers (Cluster Autoscaler, Prometheus) need somewhere
  # to run while the tainted GPU group is at zero: small on-demand nodes.
  eks_managed_node_groups = {
    system = {
      ami_type       = "AL2023_x86_64_STANDARD"
      instance_types = var.system_instance_types
      min_size       = 1
      max_size       = 3
      desired_size   = 2
    }
  }

  tags = var.tags
}
