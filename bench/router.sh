#!/usr/bin/env bash
# Router benchmark (direct vs builtin vs HAProxy): ./bench/router.sh [--duration 10]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/router.py "$@"
