output "bucket_name" {
  description = "Bucket name, for s3:// URIs in job files."
  value       = aws_s3_bucket.this.id
}

output "bucket_arn" {
  description = "Bucket ARN, for IAM policies."
  value       = aws_s3_bucket.this.arn
}

output "checkpoint_prefix" {
  description = "Prefix whose objects expire; job files put spec.checkpoint.uri under it."
  value       = var.checkpoint_prefix
}
