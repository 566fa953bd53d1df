#!/usr/bin/env bash
# Installs Debian's chromium for the headless-browser tests (Prefect UI, HTML report). Idempotent: does nothing
# when a chromium binary is already on PATH. Needs root (or sudo) and the Debian package mirror.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    command -v chromium
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: installing chromium needs root or sudo" >&2; exit 2; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >&2
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
command -v chromium
