"""`celery -A app cio ...` against a real Redis: every command, --json, exit codes, confirmations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner, Result

from cio_celery.breaker import Breaker
from cio_celery.cli import parse_duration
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.settings import settings_for_app
from cio_celery.spool import Spool
from cio_celery.testing.redis_server import free_port

ROOT = Path(__file__).resolve().parent.parent
EMAIL = "ada-secret@example.com"


@pytest.fixture(scope="module")
def cli_env(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    env = {
        "CELERY_BROKER_URL": f"{redis_base_url}/7",
        "CIO_REDIS_URL": f"{redis_base_url}/6",
        "CIO_SPOOL_DIR": str(tmp_path_factory.mktemp("cli-spool")),
        "CIO_SITE_ID": "s", "CIO_TRACK_API_KEY": "k",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def app(cli_env: dict[str, str]) -> Iterator[Any]:
    from tests.cli_app import app as cli_app

    for url in (cli_env["CELERY_BROKER_URL"], cli_env["CIO_REDIS_URL"]):
        redis.Redis.from_url(url).flushdb()
    yield cli_app
    Breaker(settings_for_app(cli_app)).reset()


def run(*args: str) -> Result:
    return CliRunner().invoke(celery_cli, ["-A", "tests.cli_app", "cio", *args], catch_exceptions=False)


def as_json(result: Result) -> Any:
    return json.loads(result.stdout)


def queued(cli_env: dict[str, str], queue: str) -> int:
    return int(redis.Redis.from_url(cli_env["CELERY_BROKER_URL"]).llen(queue))


def add_dead_letter(app: Any, operation: str = "identify", age: float = 0.0) -> str:
    store = DeadLetters(settings_for_app(app), app)
    task_id = f"t-{time.monotonic_ns()}"
    identify = operation == "identify"
    store.add(operation=operation, task_id=task_id, reason="http_400", status=400, attempts=1,
              args=["user-1"] if identify else ["user-1", "ev", {}, None, None],
              kwargs={"email": EMAIL, "_cio": {"key": task_id}} if identify else {"_cio": {"key": task_id}})
    if age:  # backdate it: the index scores entries by the time they failed
        r = redis.Redis.from_url(settings_for_app(app).redis_url or "")
        r.zadd("{cio}:dlq:index", {task_id: time.time() - age})
    return task_id


def test_durations() -> None:
    assert [parse_duration(x) for x in ("90", "45s", "30m", "2h", "7d", "1w")] == [
        90, 45, 1800, 7200, 604800, 604800]


def test_status_healthy_then_unhealthy(app: Any) -> None:
    ok = run("status", "--json")
    assert ok.exit_code == 0, ok.output
    assert as_json(ok)["breaker"]["state"] == "closed" and as_json(ok)["healthy"] is True
    text = run("status")
    assert text.exit_code == 0 and "breaker           closed" in text.stdout
    opened = run("breaker", "open", "--yes", "--json")
    assert opened.exit_code == 0 and as_json(opened) == {"action": "open", "before": "closed", "after": "open",
                                                         "trips": as_json(opened)["trips"]}
    down = run("status", "--json")
    assert down.exit_code == 1
    assert as_json(down)["breaker"]["opened_by_hand"] is True and "breaker open" in as_json(down)["problems"]
    assert "manual" in run("status").stdout


def test_breaker_needs_confirmation(app: Any) -> None:
    refused = run("breaker", "open")
    assert refused.exit_code == 1 and "--yes" in refused.stderr
    assert Breaker(settings_for_app(app)).status().state == "closed"
    assert run("breaker", "open", "--for", "30", "--yes").exit_code == 0
    st = Breaker(settings_for_app(app)).status()
    assert st.state == "open" and 25 < st.time_left <= 30
    closed = run("breaker", "close", "--yes")
    assert closed.exit_code == 0 and closed.stdout.strip() == "breaker: open -> closed"
    assert run("breaker", "reset", "--yes", "--json").exit_code == 0
    assert Breaker(settings_for_app(app)).status().trips == 0


def test_dead_letters_list_show_filters(app: Any) -> None:
    assert run("dead-letters", "list").exit_code == 1  # nothing yet
    old = add_dead_letter(app, "identify", age=3 * 3600)
    new = add_dead_letter(app, "track")
    listed = run("dead-letters", "list", "--json")
    assert listed.exit_code == 0
    assert [e["id"] for e in as_json(listed)] == [old, new]
    assert EMAIL not in listed.stdout
    assert [e["id"] for e in as_json(run("dead-letters", "list", "--operation", "track", "--json"))] == [new]
    assert [e["id"] for e in as_json(run("dead-letters", "list", "--older-than", "2h", "--json"))] == [old]
    table = run("dead-letters", "list").stdout
    assert table.splitlines()[0].split() == ["id", "operation", "reason", "status", "attempts", "age"]
    assert "2 of 2 dead letters" in table
    hidden = run("dead-letters", "show", old, "--json")
    assert hidden.exit_code == 0 and EMAIL not in hidden.stdout and "hidden" in as_json(hidden)["kwargs"]
    shown = run("dead-letters", "show", old, "--show-data", "--json")
    assert as_json(shown)["kwargs"] == {"email": EMAIL}
    assert run("dead-letters", "show", "nope").exit_code == 1


def test_dead_letters_replay_and_purge(app: Any, cli_env: dict[str, str]) -> None:
    a = add_dead_letter(app, "identify")
    b = add_dead_letter(app, "track")
    assert run("dead-letters", "replay").exit_code == 2  # no selection: usage error
    refused = run("dead-letters", "replay", "--all")
    assert refused.exit_code == 1
    replayed = run("dead-letters", "replay", "--operation", "identify", "--yes", "--json")
    assert replayed.exit_code == 0 and as_json(replayed) == {"replayed": 1}
    assert queued(cli_env, "cio") == 1
    store = DeadLetters(settings_for_app(app), app)
    assert store.get(a) is None and store.get(b) is not None
    assert run("dead-letters", "purge", "--operation", "pageview", "--yes").exit_code == 1
    purged = run("dead-letters", "purge", "--all", "--yes", "--json")
    assert as_json(purged) == {"purged": 1} and store.count() == 0


def test_fallback_release(app: Any, cli_env: dict[str, str]) -> None:
    settings = settings_for_app(app)
    fb = Fallback(settings, app)
    for i in range(3):
        fb.park("identify", f"p{i}", [f"user-{i}"], {"_cio": {"key": f"p{i}"}})
    Breaker(settings).open()
    refused = run("fallback", "release")
    assert refused.exit_code == 1 and "breaker is open" in refused.stderr and fb.depth() == 3
    forced = run("fallback", "release", "--force", "--limit", "2", "--json")
    assert forced.exit_code == 0 and as_json(forced) == {"released": 2, "remaining": 1}
    assert queued(cli_env, "cio.fallback") == 1  # identify goes in one batch task
    Breaker(settings).reset()
    assert as_json(run("fallback", "release", "--json")) == {"released": 1, "remaining": 0}


def test_spool_flush(app: Any, cli_env: dict[str, str]) -> None:
    assert as_json(run("spool", "flush", "--json")) == {"published": 0, "remaining": 0}
    spool = Spool(cli_env["CIO_SPOOL_DIR"])
    spool.put({"task": "cio_celery.identify", "args": ["user-1"], "kwargs": {"_cio": {"key": "k1"}},
               "task_id": "k1", "options": {"queue": "cio"}})
    flushed = run("spool", "flush", "--json")
    assert flushed.exit_code == 0 and as_json(flushed) == {"published": 1, "remaining": 0}
    assert queued(cli_env, "cio") == 1 and spool.depth() == 0


def subprocess_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "cio", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), capture_output=True, text=True,
        timeout=60,
    )


def test_the_entry_point_works_in_a_real_celery_command(app: Any, cli_env: dict[str, str]) -> None:
    done = subprocess_cli(cli_env, "status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["healthy"] is True


def test_store_unreachable_is_exit_3_without_the_password(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CIO_REDIS_URL": f"redis://:hunter2pw@127.0.0.1:{free_port()}/0"}
    down = subprocess_cli(env, "dead-letters", "list")
    assert down.returncode == 3, down.stderr
    assert "unreachable" in down.stderr
    assert "hunter2pw" not in down.stdout + down.stderr
    status = subprocess_cli(env, "status", "--json")
    assert status.returncode == 3 and "hunter2pw" not in status.stdout + status.stderr
