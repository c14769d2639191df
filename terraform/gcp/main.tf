# spotlora on GKE: what k8s/overlays/gke-t4 needs in an existing cluster with
# Workload Identity enabled.
#
#   T4 Spot node pool (scales from zero; GKE labels it gke-accelerator and
#   gke-spot, and taints it nvidia.com/gpu=present:NoSchedule by itself)
#   GCS bucket (models, data, outputs, checkpoints)
#   Google service account for the trainer, bound to spotlora/spotlora
#   Artifact Registry repository for the image

locals {
  # GKE sets these on every node of the pool; k8s/overlays/gke-t4 selects them.
  accelerator_type = "nvidia-tesla-t4"
  workload_member  = "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.service_account}]"
  bucket_objects   = "projects/_/buckets/${var.bucket_name}/objects"
}

data "google_container_cluster" "this" {
  name     = var.cluster_name
  location = var.location
}

# Nodes run as a minimal service account, not the Compute Engine default one
# (which holds project Editor).
resource "google_service_account" "nodes" {
  account_id   = "${var.node_pool_name}-nodes"
  display_name = "spotlora T4 spot nodes"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/artifactregistry.reader",
  ])

  project = var.project_id
  role    = each.value
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

resource "google_container_node_pool" "t4_spot" {
  name     = var.node_pool_name
  cluster  = data.google_container_cluster.this.id
  location = var.location

  node_locations = var.node_locations

  # Scale from zero: the cluster autoscaler knows the pool's labels, taints and
  # GPU from its template, so no tags are needed as on EKS.
  autoscaling {
    total_min_node_count = 0
    total_max_node_count = var.max_nodes
    location_policy      = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.machine_type
    spot            = true
    disk_size_gb    = var.disk_size_gb
    disk_type       = "pd-balanced"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]

    guest_accelerator {
      type  = local.accelerator_type
      count = 1

      gpu_driver_installation_config {
        gpu_driver_version = "DEFAULT"
      }
    }

    labels = {
      "spotlora.dev/pool" = "t4-spot"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    # Pods see the GKE metadata server (Workload Identity), never the node's
    # credentials.
    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    ignore_changes = [initial_node_count]
  }
}

resource "google_storage_bucket" "artifacts" {
  #checkov:skip=CKV_GCP_62:Access logs need a separate log bucket the caller owns; Cloud Audit Logs data access logs cover who read what.
  name          = var.bucket_name
  location      = var.bucket_location
  force_destroy = var.force_destroy

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = true
  }

  dynamic "encryption" {
    for_each = var.kms_key_name == null ? [] : [var.kms_key_name]

    content {
      default_kms_key_name = encryption.value
    }
  }

  # Checkpoints of finished or abandoned runs (a run lasts at most a day).
  lifecycle_rule {
    condition {
      age            = var.checkpoint_expiration_days
      matches_prefix = ["checkpoints/"]
    }

    action {
      type = "Delete"
    }
  }

  # Old versions everywhere else.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_expiration_days
      with_state                 = "ARCHIVED"
    }

    action {
      type = "Delete"
    }
  }

  # Uploads a preempted pod never completed.
  lifecycle_rule {
    condition {
      age = 7
    }

    action {
      type = "AbortIncompleteMultipartUpload"
    }
  }
}

resource "google_service_account" "job" {
  account_id   = var.job_service_account_id
  display_name = "spotlora trainer (${var.namespace}/${var.service_account})"
}

# Workload Identity: the Kubernetes service account spotlora/spotlora may act as
# the job's Google service account (the gke-t4 overlay's annotation names it).
resource "google_service_account_iam_member" "workload_identity" {
  service_account_id = google_service_account.job.name
  role               = "roles/iam.workloadIdentityUser"
  member             = local.workload_member
}

# Read everything the job needs, write only outputs and checkpoints. The list
# permission sits on the bucket itself, so the read grant allows it too.
resource "google_storage_bucket_iam_member" "job_read" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectViewer"
  member = "serviceAccount:${google_service_account.job.email}"
}

resource "google_storage_bucket_iam_member" "job_write" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.job.email}"

  condition {
    title       = "spotlora-write-prefixes"
    description = "Outputs and checkpoints only"
    expression  = join(" || ", [for p in var.write_prefixes : "resource.name.startsWith(\"${local.bucket_objects}/${p}\")"])
  }
}

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Google-managed encryption keys; pass a CMEK by adding kms_key_name if policy requires it.
  location      = var.region
  repository_id = var.repository_id
  format        = "DOCKER"
  description   = "spotlora trainer images"

  # Same rule as ECR on AWS: a pinned tag always names the same image.
  docker_config {
    immutable_tags = true
  }
}
