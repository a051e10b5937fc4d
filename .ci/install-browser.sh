#!/usr/bin/env bash
# Install what tests/server/test_webpage.py needs on a fresh Debian machine (run as root):
# Debian's headless Chromium and its matching chromedriver. The Python driver
# (selenium) comes with the project's dev extras (pip install -e '.[dev]').
# Idempotent: installs nothing when both binaries are already present; either way it
# ends with one line naming the versions (for the CI log), or fails with the reason.
set -euo pipefail

versions() {
    echo "install-browser.sh: $1 $(chromium --version 2>/dev/null | head -1); $(chromedriver --version 2>/dev/null | head -1)"
}

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    versions "already installed:"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-browser.sh: run as root (apt-get install chromium chromium-driver)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
versions "installed:"
