#!/usr/bin/env bash
# Make sure a Docker daemon answers on /var/run/docker.sock; start one if not.
#
# CI machines have Debian's docker.io installed but nothing started (no systemd), so
# this starts dockerd in the background, logs to $DOCKERD_LOG, and waits for the
# socket. Exit status 0: a daemon answers; 1: none could be started (the caller
# decides whether that is a failure or a skip).
set -euo pipefail

DOCKER="${DOCKER:-/usr/bin/docker}"
DOCKERD_LOG="${DOCKERD_LOG:-/tmp/spotlora-dockerd.log}"
WAIT_SECONDS="${DOCKERD_WAIT_SECONDS:-60}"

if [[ ! -x "$DOCKER" ]]; then
  echo "ensure-dockerd: $DOCKER not found (apt-get install -y docker.io)" >&2
  exit 1
fi
if "$DOCKER" info >/dev/null 2>&1; then
  exit 0
fi
if ! command -v dockerd >/dev/null 2>&1; then
  echo "ensure-dockerd: no daemon answers and dockerd is not installed" >&2
  exit 1
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "ensure-dockerd: no daemon answers and only root can start dockerd" >&2
  exit 1
fi

echo "ensure-dockerd: starting dockerd (log: $DOCKERD_LOG)" >&2
nohup dockerd >"$DOCKERD_LOG" 2>&1 &
dockerd_pid=$!
for _ in $(seq "$WAIT_SECONDS"); do
  if [[ -S /var/run/docker.sock ]] && "$DOCKER" info >/dev/null 2>&1; then
    exit 0
  fi
  if ! kill -0 "$dockerd_pid" 2>/dev/null; then
    echo "ensure-dockerd: dockerd exited; last lines of $DOCKERD_LOG:" >&2
    tail -n 20 "$DOCKERD_LOG" >&2
    exit 1
  fi
  sleep 1
done
echo "ensure-dockerd: dockerd did not answer within ${WAIT_SECONDS}s" >&2
tail -n 20 "$DOCKERD_LOG" >&2
exit 1
