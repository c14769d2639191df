# A managed node group of T4 spot instances for the trainer, scaled from zero.
#
# The label and taint below are a contract with k8s/: the eks-t4 overlay
# selects spotlora.dev/pool=t4-spot and the base Job tolerates nvidia.com/gpu.
# tests/deploy parses this file and the rendered overlay to keep them equal.

locals {
  node_labels = {
    "spotlora.dev/pool" = "t4-spot"
  }

  node_taint = {
    key    = "nvidia.com/gpu"
    value  = "true"
    effect = "NO_SCHEDULE"
  }

  # Cluster Autoscaler reads these from the Auto Scaling group to build a node
  # template when the group is at zero and no node exists to look at: without
  # them it cannot tell that a node would carry the label, the taint and a GPU,
  # and never scales up for the trainer.
  autoscaler_tags = merge(
    {
      "k8s.io/cluster-autoscaler/enabled"                                     = "true"
      "k8s.io/cluster-autoscaler/${var.cluster_name}"                         = "owned"
      "k8s.io/cluster-autoscaler/node-template/resources/nvidia.com/gpu"      = tostring(var.gpus_per_node)
      "k8s.io/cluster-autoscaler/node-template/resources/ephemeral-storage"   = "${var.disk_size_gib}G"
      "k8s.io/cluster-autoscaler/node-template/taint/${local.node_taint.key}" = "${local.node_taint.value}:NoSchedule"
    },
    { for key, value in local.node_labels : "k8s.io/cluster-autoscaler/node-template/label/${key}" => value },
  )

  # nodeadm (AL2023) merges this NodeConfig with the one EKS generates for a
  # managed node group. Graceful node shutdown: on a spot reclaim or scale-down
  # the kubelet holds the shutdown for shutdownGracePeriod, gives regular pods
  # all of it except shutdownGracePeriodCriticalPods, and marks them
  # DisruptionTarget (which the Job's podFailurePolicy ignores).
  user_data = <<-EOT
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="//"

    --//
    Content-Type: application/node.eks.aws

    ---
    apiVersion: node.eks.aws/v1alpha1
    kind: NodeConfig
    spec:
      kubelet:
        config:
          shutdownGracePeriod: ${var.shutdown_grace_period_seconds}s
          shutdownGracePeriodCriticalPods: ${var.shutdown_grace_period_critical_pods_seconds}s

    --//--
  EOT
}

data "aws_partition" "current" {}

data "aws_iam_policy_document" "node_trust" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name_prefix        = "${var.name}-node-"
  description        = "spotlora T4 spot nodes of ${var.cluster_name}"
  assume_role_policy = data.aws_iam_policy_document.node_trust.json

  tags = var.tags
}

# The standard worker policies; pods get their own role (job-identity), not these.
resource "aws_iam_role_policy_attachment" "node" {
  for_each = toset([
    "AmazonEKSWorkerNodePolicy",
    "AmazonEKS_CNI_Policy",
    "AmazonEC2ContainerRegistryPullOnly",
  ])

  role       = aws_iam_role.node.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/${each.value}"
}

resource "aws_launch_template" "this" {
  #checkov:skip=CKV_AWS_341:Hop limit 2 lets the trainer read the EC2 spot interruption notice from IMDSv2 (preemption.spot_notice: aws) and checkpoint within the 2-minute warning; IMDSv2 tokens stay required and the node role holds only the standard worker policies.
  name_prefix            = "${var.name}-"
  description            = "spotlora T4 spot nodes: disk, IMDSv2, kubelet graceful shutdown"
  update_default_version = true

  # The root volume holds the multi-GB CUDA image and the trainer's emptyDir
  # volumes (a 7B model cache is ~40 GiB), so the 20 GiB default is far too small.
  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_size           = var.disk_size_gib
      volume_type           = "gp3"
      iops                  = 3000
      throughput            = 250
      encrypted             = true
      kms_key_id            = var.ebs_kms_key_arn
      delete_on_termination = true
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = var.imds_hop_limit
  }

  monitoring {
    enabled = true
  }

  user_data = base64encode(local.user_data)

  tag_specifications {
    resource_type = "instance"
    tags          = merge(var.tags, { Name = "${var.cluster_name}-${var.name}" })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(var.tags, { Name = "${var.cluster_name}-${var.name}" })
  }

  tags = var.tags
}

resource "aws_eks_node_group" "this" {
  cluster_name    = var.cluster_name
  node_group_name = var.name
  node_role_arn   = aws_iam_role.node.arn
  subnet_ids      = var.subnet_ids
  version         = var.kubernetes_version

  # NVIDIA driver and container toolkit preinstalled; nodeadm bootstraps.
  ami_type       = "AL2023_x86_64_NVIDIA"
  capacity_type  = "SPOT"
  instance_types = var.instance_types
  labels         = local.node_labels

  taint {
    key    = local.node_taint.key
    value  = local.node_taint.value
    effect = local.node_taint.effect
  }

  scaling_config {
    min_size     = 0
    max_size     = var.max_size
    desired_size = 0
  }

  update_config {
    max_unavailable = 1
  }

  launch_template {
    id      = aws_launch_template.this.id
    version = aws_launch_template.this.latest_version
  }

  tags = var.tags

  # The autoscaler owns the size once the group exists.
  lifecycle {
    ignore_changes = [scaling_config[0].desired_size]
  }

  depends_on = [aws_iam_role_policy_attachment.node]
}

# Managed node groups do not copy their tags to the Auto Scaling group, where
# Cluster Autoscaler looks for them.
resource "aws_autoscaling_group_tag" "cluster_autoscaler" {
  for_each = local.autoscaler_tags

  autoscaling_group_name = aws_eks_node_group.this.resources[0].autoscaling_groups[0].name

  tag {
    key                 = each.key
    value               = each.value
    propagate_at_launch = false
  }
}
