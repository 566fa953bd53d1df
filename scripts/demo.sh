#!/usr/bin/env bash
# The main job: the whole pipeline on the embedded default (no network, no API key).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
exec distill run "${1:-configs/default.toml}"
