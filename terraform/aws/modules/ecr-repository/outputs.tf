output "repository_url" {
  description = "Image URL without tag: the newName for the kustomize images: entry."
  value       = aws_ecr_repository.this.repository_url
}

output "repository_arn" {
  description = "Repository ARN, for push permissions in CI."
  value       = aws_ecr_repository.this.arn
}
