"""The job manifest: its schema and how it is loaded."""

from service.manifest.load import LoadedManifest, load_manifest, validate_document
from service.manifest.spec import FineTuneJob, JobSpec

__all__ = ["FineTuneJob", "JobSpec", "LoadedManifest", "load_manifest", "validate_document"]
