#!/usr/bin/env bash
# CI entry for the container checks: start dockerd if needed, build (or reuse) the
# debootstrap base, build the image, then run tests/container against it, timing
# each phase. Exits non-zero on any failure; under CI=true a missing Docker fails.
#
#   docker/ci-container-test.sh [extra pytest args]
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export DOCKER="${DOCKER:-/usr/bin/docker}"
export CI="${CI:-true}"
PYTEST="${PYTEST:-$repo/.venv/bin/pytest}"
tag="${SPOTLORA_TEST_IMAGE:-spotlora:ci}"

phase() { # name, command...
  local name="$1" start
  shift
  start="$(date +%s)"
  "$@"
  echo "ci-container-test: $name took $(($(date +%s) - start))s" >&2
}

phase dockerd docker/ensure-dockerd.sh
start="$(date +%s)"
base="$(docker/build-base.sh)"
echo "ci-container-test: base took $(($(date +%s) - start))s ($base)" >&2
phase image env BASE_IMAGE="$base" docker/build-image.sh "$tag"
phase tests env SPOTLORA_TEST_IMAGE="$tag" "$PYTEST" tests/container -p no:cacheprovider "$@"
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' "$tag" >&2
