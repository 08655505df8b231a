#!/usr/bin/env bash
# The demo: a celery worker delivering to a local fake Customer.io, faults injected.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
python3 example_project/demo.py
