#!/usr/bin/env bash
# The test command: installs what is missing, then runs the suite (chaos included; CIO_FULL=1 adds
# the long variants). Two pytest processes (CIO_TEST_PROCESSES; 0 for one): the scenarios with
# real worker subprocesses (group "serial") run one at a time in one of them, the rest is
# shared. Each process starts its own redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
set +e
procs="${CIO_TEST_PROCESSES:-2}"
if [ "$procs" -gt 0 ]; then
  python3 -m pytest -q -n "$procs" --dist loadgroup "$@"
else
  python3 -m pytest -q "$@"
fi
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests"
  exit 0
fi
exit "$status"
