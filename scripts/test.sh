#!/usr/bin/env bash
# The test command: installs what is missing, then runs the whole suite (chaos included).
# The suite starts its own redis-server unless CIO_TEST_REDIS_URL points at one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
set +e
python3 -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$status"
