#!/usr/bin/env bash
# Build the spotlora image the way CI does: on the debootstrap base (build-base.sh)
# with torch's CPU wheel from the build context, since CI reaches no container
# registry and PyPI's plain torch is a multi-GB CUDA build. Same Dockerfile as
# production; only the build args differ.
#
#   docker/build-image.sh [TAG]          (default TAG: spotlora:ci)
#
# Env: TORCH_WHEEL (default: the newest /opt/wheels/torch-*+cpu-cp311-*.whl),
#      BASE_IMAGE (default: built/reused by docker/build-base.sh),
#      DOCKER (default /usr/bin/docker, whose `build` uses BuildKit).
set -euo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}"
tag="${1:-spotlora:ci}"
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$script_dir/.." && pwd)"

wheel="${TORCH_WHEEL:-}"
if [[ -z "$wheel" ]]; then
  wheel="$(find /opt/wheels -maxdepth 1 -name 'torch-*+cpu-cp311-*.whl' 2>/dev/null | sort -V | tail -n 1)"
fi
if [[ -z "$wheel" || ! -f "$wheel" ]]; then
  echo "build-image: no CPU torch wheel (set TORCH_WHEEL=/path/to/torch-X+cpu-cp311-...whl)" >&2
  exit 1
fi
# torch-2.13.0+cpu-cp311-... -> torch==2.13.0+cpu
torch_version="$(basename "$wheel" | cut -d- -f2)"

base="${BASE_IMAGE:-$("$script_dir/build-base.sh")}"

# Only this one wheel in the context: a stale one would be found by pip too.
find "$repo/docker/wheels" -maxdepth 1 -name '*.whl' ! -name "$(basename "$wheel")" -delete
if [[ ! -f "$repo/docker/wheels/$(basename "$wheel")" ]]; then
  cp "$wheel" "$repo/docker/wheels/"
fi

revision="$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "build-image: $tag on $base with torch==$torch_version" >&2
DOCKER_BUILDKIT=1 "$DOCKER" build \
  --build-arg BASE_IMAGE="$base" \
  --build-arg TORCH_SPEC="torch==$torch_version" \
  --build-arg TORCH_INDEX_URL= \
  --build-arg REVISION="$revision" \
  --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  --tag "$tag" \
  "$repo"
