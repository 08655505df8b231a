#!/usr/bin/env bash
# The install test: the package installed as a user installs it, in bare virtualenvs (no dev
# extras, no test dependencies), each form followed through its quickstart to a delivered event:
#
#   pip install .            then README.md's "Use it"     (a celery worker, identify.delay)
#   pip install ".[django]"  then docs/django.md          (startproject, runserver, delay_on_commit)
#   pip install ".[flask]"   then docs/flask.md           (the app factory, flask run)
#
# Each walk (scripts/walkthrough.py, run by the virtualenv's own python) starts a real
# redis-server, the fake Customer.io from the command line (python -m cio_celery.testing) and a
# real `celery worker`, and ends when the fake has applied an identify. The three virtualenvs
# share one pip cache. Prints, per form, the seconds from `pip install` to the first delivered
# event; exits non-zero if any form fails. Needs redis-server on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${CIO_INSTALL_PYTHON:-python3}"
WORK="$(mktemp -d -t cio-install-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export PIP_CACHE_DIR="${CIO_INSTALL_PIP_CACHE:-$WORK/pip-cache}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset PYTHONPATH VIRTUAL_ENV DJANGO_SETTINGS_MODULE || true
for var in $(env | grep -oE '^(CIO|CELERY)_[A-Z0-9_]*' || true); do unset "$var"; done

if "$PY" -c "import virtualenv" >/dev/null 2>&1; then
  make_venv() { "$PY" -m virtualenv -q "$1"; }
else
  make_venv() { "$PY" -m venv "$1"; }   # Debian: needs python3-venv
fi

# What a clone holds: the committed tree (no build leftovers, no work in progress).
mkdir -p "$WORK/src"
git -C "$ROOT" archive HEAD | tar -x -C "$WORK/src"

status=0
summary=()
for form in plain django flask; do
  case "$form" in
    plain)  spec="$WORK/src";          doc="README.md" ;;
    django) spec="$WORK/src[django]";  doc="docs/django.md" ;;
    flask)  spec="$WORK/src[flask]";   doc="docs/flask.md" ;;
  esac
  venv="$WORK/venv-$form"
  echo "== $form: a bare virtualenv, pip install ${spec#"$WORK/"}"
  make_venv "$venv"
  start=$(date +%s.%N)
  if ! "$venv/bin/python" -m pip install -q "$spec"; then
    echo "FAILED: pip install ${spec#"$WORK/"}"; status=1; summary+=("$form: pip install failed"); continue
  fi
  installed=$(date +%s.%N)
  # Nothing of the dev install may leak in: the walk must run on what pip just installed.
  "$venv/bin/python" - "$form" <<'EOF'
import importlib.util, sys
form = sys.argv[1]
for name in ("pytest", "hypothesis", "flower", "tox", "mkdocs") + {"plain": ("django", "flask"), "django": ("flask",), "flask": ("django",)}[form]:
    assert importlib.util.find_spec(name) is None, f"{name} is installed in the bare {form} virtualenv"
import packaging, kombu.transport.redis  # what a plain `celery` dependency lacked
print("   only runtime dependencies; kombu's Redis transport imports")
EOF
  out="$WORK/walk-$form.json"
  if "$venv/bin/python" "$WORK/src/scripts/walkthrough.py" "$WORK/src/$doc" --json >"$out"; then
    seconds=$("$venv/bin/python" -c "
import json, sys
r = json.load(open(sys.argv[1])); pip = float(sys.argv[3]) - float(sys.argv[2])
print(f'{pip:.1f} {pip + r[\"seconds_to_first_delivery\"]:.1f} {\",\".join(r[\"applied\"])}')" "$out" "$start" "$installed")
    read -r pip_s total_s ops <<<"$seconds"
    echo "   delivered ($ops): pip install ${pip_s}s; pip install to first delivered event ${total_s}s"
    summary+=("$form ($doc): pip install ${pip_s}s, to first delivered event ${total_s}s")
  else
    echo "FAILED: $doc in the $form virtualenv"; cat "$out"; status=1; summary+=("$form: FAILED")
  fi
done

echo "== install test"
printf '   %s\n' "${summary[@]}"
exit "$status"
