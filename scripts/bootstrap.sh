#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if ! python3 -c "import cio_celery, pytest, xdist, hypothesis, django, django_redis, flask, flower, prometheus_client, mkdocs" >/dev/null 2>&1 \
   || [ "${CIO_BOOTSTRAP_FORCE:-0}" = "1" ]; then
  python3 -m pip install -q -e ".[dev]"
fi
