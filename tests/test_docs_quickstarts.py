"""The quickstarts run as written: scripts/walkthrough.py builds what README.md, docs/django.md and
docs/flask.md describe in a new folder (their files, their commands, their servers: a real Redis,
the fake Customer.io started from the command line, a real ``celery worker``, Django's runserver or
``flask run``) and succeeds when the fake has applied the ``identify`` their code sends.

The same script runs in bare virtualenvs in CI (scripts/install_test.sh); here it runs with the
suite's interpreter, so a doc that drifts from the code fails the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WALKTHROUGH = ROOT / "scripts" / "walkthrough.py"

pytestmark = pytest.mark.slow


def walk(doc: str, keep: Path | None = None) -> dict[str, Any]:
    args = [sys.executable, str(WALKTHROUGH), str(ROOT / doc), "--json"]
    if keep is not None:
        args += ["--keep", str(keep)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIO_", "CELERY_"))}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, check=False)
    result = json.loads(done.stdout) if done.stdout.strip().startswith("{") else {"ok": False, "error": done.stderr}
    assert result["ok"], result.get("error")
    assert done.returncode == 0
    return result


def ran(result: dict[str, Any], fragment: str) -> list[dict[str, Any]]:
    return [s for s in result["steps"] if fragment in (s.get("line") or "")]


def test_the_readme_delivers_an_identify_and_status_is_healthy() -> None:
    result = walk("README.md")
    assert "identify" in result["applied"]
    [worker] = ran(result, " worker -Q cio,cio.send,cio.fallback -E")
    assert worker["what"] == "server"
    [status] = ran(result, "cio status")
    assert status["exit"] == 0 and status["stdout"].startswith("cio_celery: healthy")


def test_the_django_quickstart_delivers_on_commit_and_reports_healthy(tmp_path: Path) -> None:
    result = walk("docs/django.md", keep=tmp_path)
    assert result["applied"] == ["identify", "track"]
    assert [s["file"] for s in result["steps"] if "file" in s] == [
        "proj/settings.py", "proj/celery.py", "proj/__init__.py", "proj/views.py", "proj/urls.py"]
    [check] = ran(result, "manage.py check")
    assert check["exit"] == 0 and "no issues" in check["stdout"]
    [health] = ran(result, "/cio/health/")
    body = json.loads(health["stdout"])
    assert body["healthy"] is True and body["credentials"]["source"] == "workers"
    assert {q: v["consumers"] for q, v in body["queues"].items()} == {"cio": 1, "cio.send": 1, "cio.fallback": 1}
    if ran(result, "flower"):  # flower installed (the dev install): its API answers with the switch
        [api] = [s for s in result["steps"] if s.get("what") == "flower api"]
        assert api["status"] == 200

    # The project the doc built: bad environment values are E-codes naming the variable, never a traceback.
    project = Path(result["project"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CIO_", "CELERY_", "DJANGO_"))}
    env.update(result["env"])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for variable, value, text in (
        ("CIO_TIMEOUT", "abc", "CIO_TIMEOUT cannot be parsed"),
        ("CIO_REDIS_URL", "http://user:pw-not-shown@example.invalid/0", "CIO_REDIS_URL must be a redis://"),
        ("CIO_MAX_RETRIES", "-1", "CIO_MAX_RETRIES must be 0 or more"),
    ):
        done = subprocess.run([sys.executable, "manage.py", "check"], cwd=project, env={**env, variable: value},
                              capture_output=True, text=True, timeout=120, check=False)
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "Traceback" not in out and "cio_celery.E003" in out and text in out, out
        assert "pw-not-shown" not in out


def test_the_flask_quickstart_delivers_and_reports_healthy() -> None:
    result = walk("docs/flask.md")
    assert result["applied"] == ["identify", "track"]
    [health] = ran(result, "/cio/health")
    body = json.loads(health["stdout"])
    assert body["healthy"] is True and body["problems"] == []
    assert {q: v["consumers"] for q, v in body["queues"].items()} == {"cio": 1, "cio.send": 1, "cio.fallback": 1}
    [status] = ran(result, "cio status")
    assert status["exit"] == 0
