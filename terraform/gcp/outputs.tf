output "job_service_account_email" {
  description = "The iam.gke.io/gcp-service-account annotation in k8s/overlays/gke-t4."
  value       = google_service_account.job.email
}

output "bucket_name" {
  description = "Artifact bucket for the job files' URIs."
  value       = google_storage_bucket.artifacts.name
}

output "image_repository" {
  description = "The newName prefix of the images: entry in k8s/overlays/gke-t4 (append /spotlora)."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "node_pool_name" {
  description = "T4 spot node pool."
  value       = google_container_node_pool.t4_spot.name
}
