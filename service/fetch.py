"""Where a model's files come from: a local directory, an S3 prefix (cached), or the Hub,
and what a refusal from each means (a missing or gated model is the manifest's error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

from service.errors import DependencyError, ManifestError
from service.manifest.spec import ModelSpec
from service.storage import S3Storage, fetch_cached, split_s3_uri

log = structlog.get_logger(__name__)

# Files a causal LM directory needs besides its weights; pickled weights are never fetched.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")


def fetch_model(spec: ModelSpec, cache_dir: Path, hf_token: str | None = None) -> Path:
    """Return a local directory holding the model, downloading it once if needed."""
    source = spec.source
    if source.startswith("s3://"):
        return _fetch_s3_model(source, cache_dir / "models")
    local = _local_dir(source)
    if local is not None:
        return local
    return _fetch_hub_model(spec, cache_dir / "hub", hf_token)


def _local_dir(source: str) -> Path | None:
    """A local model directory, checked; None for a Hub id. A path that is not there is the
    manifest's error, never a Hub lookup of a path."""
    local = Path(source).expanduser()
    if local.is_dir():
        _check_model_dir(local, source)
        return local
    if source.startswith(("/", "./", "../", "~")) or local.suffix:
        raise ManifestError(f"spec.model.source: {source}: no such directory")
    return None


# What the Hub answers for a model that is not there (or private), needs a token, or is gated
# and not granted: retrying cannot help (exit 2). Anything else may pass (exit 69).
HUB_REFUSALS = {
    401: "the Hub refused an anonymous or invalid token (401): a private or gated model needs "
    "HF_TOKEN with access",
    403: "the Hub denied access (403): a gated model whose terms this token's account has not "
    "accepted, or a token without read access",
    404: "no such model or revision on the Hub (404); a private one also answers so without "
    "HF_TOKEN",
}


def hub_error(spec: ModelSpec, err: BaseException) -> DependencyError | ManifestError:
    """The Hub client's error as the service's: its HTTP status, wherever the client and
    transformers wrapped it (their cause chains), decides whether a retry can help."""
    seen: BaseException | None = err
    while seen is not None:
        status = getattr(getattr(seen, "response", None), "status_code", None)
        if status in HUB_REFUSALS:
            revision = f" at revision {spec.revision}" if spec.revision else ""
            return ManifestError(
                f"spec.model.source: {spec.source}{revision}: {HUB_REFUSALS[status]}"
            )
        seen = seen.__cause__ or seen.__context__
    return DependencyError(f"spec.model.source: {spec.source}: {type(err).__name__}: {err}")


def _check_model_dir(path: Path, origin: str) -> None:
    if not (path / "config.json").is_file():
        raise ManifestError(f"spec.model.source: {origin}: no config.json (not a saved model)")
    if not any(path.glob("*.safetensors")):
        raise ManifestError(
            f"spec.model.source: {origin}: no .safetensors weights (pickled weights are refused)"
        )


def _fetch_s3_model(uri: str, cache_root: Path) -> Path:
    """A model prefix, downloaded once into the cache (see storage.fetch_cached)."""
    bucket, prefix = split_s3_uri(uri if uri.endswith("/") else uri + "/")
    store = S3Storage(f"s3://{bucket}/{prefix}")
    objects = [
        o for o in store.list_objects() if o.key.endswith(MODEL_FILE_SUFFIXES) and "/" not in o.key
    ]
    if not objects:
        raise ManifestError(f"spec.model.source: {uri}: no model files under this prefix")
    target = cache_root / bucket / prefix.strip("/")
    target.mkdir(parents=True, exist_ok=True)
    fetched = fetch_cached(store, objects, target)
    if fetched:
        log.info("model_download", uri=uri, files=len(fetched), bytes=sum(o.size for o in fetched))
    else:
        log.info("model_cache_hit", uri=uri, path=str(target))
    _check_model_dir(target, uri)
    return target


def _fetch_hub_model(spec: ModelSpec, cache_root: Path, hf_token: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            spec.source,
            revision=spec.revision,
            cache_dir=str(cache_root),
            allow_patterns=[f"*{s}" for s in MODEL_FILE_SUFFIXES],
            token=hf_token,
        )
    except Exception as err:  # the hub client raises many types
        raise hub_error(spec, err) from None
    _check_model_dir(Path(path), spec.source)
    return Path(path)


def fetch_config(spec: ModelSpec, hf_token: str | None = None) -> Any:
    """The model's config.json alone (a few kB), wherever the model lives."""
    import tempfile

    from transformers import AutoConfig

    kwargs = {"trust_remote_code": spec.trust_remote_code}
    if spec.source.startswith("s3://"):
        bucket, prefix = split_s3_uri(
            spec.source if spec.source.endswith("/") else spec.source + "/"
        )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                S3Storage(f"s3://{bucket}/{prefix}").download_file(
                    "config.json", Path(tmp) / "config.json"
                )
            except FileNotFoundError:
                raise ManifestError(f"spec.model.source: {spec.source}: no config.json") from None
            return AutoConfig.from_pretrained(tmp, **kwargs)
    local = _local_dir(spec.source)
    if local is not None:
        return AutoConfig.from_pretrained(local, **kwargs)
    try:
        return AutoConfig.from_pretrained(
            spec.source, revision=spec.revision, token=hf_token, **kwargs
        )
    except Exception as err:  # the hub client raises many types
        raise hub_error(spec, err) from None
