#!/usr/bin/env bash
# Docker runtime benchmark (castiron on Docker vs docker-compose up -d, and vs docker run):
# ./bench/docker_deploy.sh [--rounds 3] [--runs 5] [--rate 200]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/docker_deploy.py "$@"
