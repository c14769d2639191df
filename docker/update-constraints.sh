#!/usr/bin/env bash
# Regenerate docker/constraints.txt from a built image: the exact version of every
# distribution installed besides torch (pinned by TORCH_SPEC), the project and pip.
#
#   docker/update-constraints.sh [IMAGE]     (default: spotlora:ci)
#
# Bootstrapping after a dependency change: empty the file, build, run this, rebuild.
set -euo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}"
image="${1:-spotlora:ci}"
out="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/constraints.txt"

versions="$("$DOCKER" run --rm --network none --entrypoint python "$image" -c '
import importlib.metadata as m
skip = {"torch", "spotlora", "pip"}
names = {f"{d.name}=={d.version}" for d in m.distributions() if d.name.lower() not in skip}
print("\n".join(sorted(names, key=str.lower)))
')"
{
  echo "# Versions of everything pip installs besides torch, for reproducible images."
  echo "# pyproject.toml pins the direct dependencies; this pins the rest. Regenerate"
  echo "# with docker/update-constraints.sh after changing pyproject.toml, and review"
  echo "# the diff. torch and its nvidia-* wheels are pinned by TORCH_SPEC instead."
  echo "$versions"
} >"$out"
echo "update-constraints: $(echo "$versions" | wc -l) pins written to $out" >&2
