#!/usr/bin/env bash
# Install what tests/server/test_replicas.py and bench/replicas.py need on a fresh Debian
# machine (run as root): Debian's nginx, the reverse proxy that docker-compose.yml puts
# in front of the replicas (deploy/nginx/nginx.conf). The tests start their own nginx on
# loopback with a generated configuration; the system service is not used (and is not
# started by this script's install: policy-rc.d is left alone, so on Debian the package's
# service may start; nothing here depends on it).
# Idempotent: installs nothing when the binary is already present; either way it ends
# with one line naming the version (for the CI log), or fails with the reason.
set -euo pipefail

NGINX="$(command -v nginx || true)"
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx

version() {
    echo "install-proxy.sh: $1 $("$NGINX" -v 2>&1 | head -1)"
}

if [ -n "$NGINX" ]; then
    version "already installed:"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-proxy.sh: run as root (apt-get install nginx-light or nginx)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends nginx >/dev/null
NGINX=/usr/sbin/nginx
version "installed:"
