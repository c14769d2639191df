#!/usr/bin/env bash
# Build the CI base image: Debian 12 (bookworm) + its python3.11, made with
# debootstrap and `docker import`, because CI reaches no container registry.
#
# The tag is a hash of this recipe (this script, the suite, the package list, the
# mirror and the CA certificates baked in), so an unchanged recipe reuses the
# image already in the daemon and a changed one builds a new tag. Prints the tag
# on stdout; everything else goes to stderr.
#
# Production builds do not use this: they take python:3.11-slim-bookworm from a
# registry (Dockerfile's BASE_IMAGE default).
set -euo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}"
SUITE="${BASE_SUITE:-bookworm}"
MIRROR="${BASE_MIRROR:-http://deb.debian.org/debian}"
# python3-venv brings ensurepip (pip for the build stage); ca-certificates the
# trust store pip uses; nothing else is needed at run time.
PACKAGES="python3,python3-venv,ca-certificates"
CA_DIR="${BASE_CA_DIR:-/usr/local/share/ca-certificates}"
REPO_NAME="${BASE_REPO:-spotlora-base}"

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

recipe_hash() {
  {
    cat "${BASH_SOURCE[0]}"
    printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES"
    if [[ -d "$CA_DIR" ]]; then
      find "$CA_DIR" -type f -name '*.crt' -print0 | sort -z | xargs -0r cat
    fi
  } | sha256sum | cut -c1-16
}

tag="${REPO_NAME}:${SUITE}-$(recipe_hash)"
if "$DOCKER" image inspect "$tag" >/dev/null 2>&1; then
  echo "build-base: reusing $tag" >&2
  echo "$tag"
  exit 0
fi

for tool in debootstrap chroot; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-base: $tool not found (apt-get install -y debootstrap)" >&2
    exit 1
  fi
done

workdir="$(mktemp -d "${TMPDIR:-/tmp}/spotlora-base.XXXXXX")"
trap 'rm -rf "$workdir"' EXIT
rootfs="$workdir/rootfs"

echo "build-base: debootstrap $SUITE into $rootfs" >&2
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
  >"$workdir/debootstrap.log" 2>&1; then
  tail -n 30 "$workdir/debootstrap.log" >&2
  exit 1
fi

# This machine's extra CAs (a TLS-intercepting egress proxy, a corporate CA), so
# pip inside the build reaches PyPI the way this machine does.
if [[ -d "$CA_DIR" ]]; then
  find "$CA_DIR" -type f -name '*.crt' -exec cp {} "$rootfs/usr/local/share/ca-certificates/" \;
fi
chroot "$rootfs" update-ca-certificates >/dev/null

# Nothing in the image runs apt; drop what only apt needs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*

echo "build-base: importing as $tag" >&2
tar --numeric-owner -C "$rootfs" -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  --message "debootstrap $SUITE minbase + $PACKAGES (spotlora CI base, $script_dir)" \
  - "$tag" >&2
echo "$tag"
