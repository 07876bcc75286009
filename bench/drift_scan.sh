#!/usr/bin/env bash
# Filesystem drift scans (full and fast) next to sha256sum, openssl dgst and aide --check.
# Usage: bench/drift_scan.sh [--dir DIR] [--runs 3] [--files 20000] [--mb 1000] [--fast-files 100000]
# See bench/drift_scan.py for what is generated and measured; results go in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/drift_scan.py "$@"
