"""`celery -A app cio ...` against a real Redis: every command, --json, exit codes, confirmations.

In-process runs go through Celery's own click group (``celery.bin.celery.celery``) with
``-A tests.cli_app``; subprocess runs (``python -m celery``) prove the ``celery.commands``
entry point, a terminal's confirmation, and the failure paths with other URLs. The app's
broker and store are databases 7 and 6 of the test redis-server, apart from the other tests.
"""

from __future__ import annotations

import base64
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from celery import Celery
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner, Result

from cio_celery.breaker import breaker_for
from cio_celery.cli import parse_duration
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.settings import settings_for_app
from cio_celery.spool import list_rows, publisher_for, spool_for
from cio_celery.store import key
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer, free_port
from tests.helpers import wait_until
from tests.workers import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent

EMAIL = "ada-secret@example.com"
# Most tests here run no worker (it would take the messages they look at in the broker): the
# missing consumers are reported but not judged. tests/test_health.py runs real workers.
NO_WORKER = ("--ignore", "queue_not_consumed", "--inspect-timeout", "0.2")
PASSWORD = "hunter2-not-for-print"


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_env(redis_base_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment tests.cli_app is configured by (set before it is first imported)."""
    env = {
        "CELERY_BROKER_URL": f"{redis_base_url}/7",
        "CIO_REDIS_URL": f"{redis_base_url}/6",
        "CIO_SPOOL_DIR": str(tmp_path_factory.mktemp("cli-spool")),
        # What the workers would have; the status reports what this process lacks when no worker answers.
        "CIO_SITE_ID": "cli-site", "CIO_TRACK_API_KEY": "cli-track-key", "CIO_APP_API_KEY": "cli-app-key",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _empty_spool(app: Any) -> None:
    """Every row of the app's spool file on this host, pending and quarantined, deleted."""
    spool = spool_for(app)
    for row in spool.rows():
        spool.delete(row[1])


@pytest.fixture()
def app(cli_env: dict[str, str]) -> Iterator[Any]:
    """tests.cli_app over a clean broker, store and spool."""
    from tests.cli_app import app as cli_app

    for url in (cli_env["CELERY_BROKER_URL"], cli_env["CIO_REDIS_URL"]):
        redis.Redis.from_url(url).flushdb()
    _empty_spool(cli_app)
    yield cli_app
    breaker_for(settings_for_app(cli_app)).reset()
    _empty_spool(cli_app)


def run(*args: str) -> Result:
    """`celery -A tests.cli_app cio ARGS` in this process (stdin is not a terminal)."""
    return CliRunner().invoke(celery_cli, ["-A", "tests.cli_app", "cio", *args], catch_exceptions=False)


def run_sub(env: dict[str, str], *args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    """`python -m celery -A tests.cli_app cio ARGS` in a subprocess: the installed entry point."""
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tests.cli_app", "cio", *args],
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), stdin=stdin,
        capture_output=True, text=True, timeout=60,
    )


def doc(result: Result | subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document a --json run printed on stdout."""
    return json.loads(result.stdout)


def settings(app: Any) -> Any:
    return settings_for_app(app)


def queued(cli_env: dict[str, str], queue: str) -> list[dict[str, Any]]:
    """The messages waiting in a broker queue, decoded (task name, id, args, kwargs)."""
    out = []
    for raw in redis.Redis.from_url(cli_env["CELERY_BROKER_URL"]).lrange(queue, 0, -1):
        msg = json.loads(raw)
        body = msg["body"]
        if msg["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        out.append({"task": msg["headers"]["task"], "id": msg["headers"]["id"], "args": args, "kwargs": kwargs})
    return out


def add_dead_letter(app: Any, operation: str = "identify", age: float = 0.0, key_: str | None = None,
                    reason: str = "http_400", status: int | None = 400) -> str:
    """A dead letter in the real store (as a worker adds it), backdated by ``age`` seconds."""
    store = DeadLetters(settings(app), app)
    task_id = f"t-{time.monotonic_ns()}"
    meta = {"key": key_ or task_id, "enqueued_at": round(time.time(), 3)}
    if operation == "identify":
        args, kwargs = ["user-1"], {"email": EMAIL, "_cio": meta}
    elif operation == "track":
        args, kwargs = ["user-1", "signed_up", {"email": EMAIL}, "01JABCDEFGHJKMNPQRSTVWXYZ0", None], {"_cio": meta}
    else:
        args, kwargs = [{"to": EMAIL, "transactional_message_id": "7", "identifiers": {"id": "user-1"}}], \
            {"_cio": meta}
    store.add(operation=operation, task_id=task_id, reason=reason, status=status, attempts=1, args=args,
              kwargs=kwargs)
    if age:  # the index scores entries by the time they failed
        client = redis.Redis.from_url(settings(app).redis_url)
        client.zadd(key(settings(app), "dlq", "index"), {task_id: time.time() - age}, xx=True)
    return task_id


# -- durations and the entry point -----------------------------------------------------------------


def test_durations() -> None:
    assert [parse_duration(x) for x in ("90", "45s", "30m", "2h", "7d", "1w", "1.5h")] == [
        90, 45, 1800, 7200, 604800, 604800, 5400]
    with pytest.raises(click.BadParameter):
        parse_duration("2 hours")


def test_the_entry_point_is_installed_and_runs_in_a_real_celery_command(app: Any, cli_env: dict[str, str]) -> None:
    assert "cio_celery.cli:cio" in [ep.value for ep in entry_points(group="celery.commands") if ep.name == "cio"]
    done = run_sub(cli_env, "status", "--json", *NO_WORKER)
    assert done.returncode == 0, done.stdout + done.stderr
    assert doc(done)["healthy"] is True and doc(done)["breaker"]["state"] == "closed"
    helped = run_sub(cli_env, "--help")
    assert helped.returncode == 0
    for command in ("status", "breaker", "dead-letters", "quarantine", "fallback", "spool"):
        assert command in helped.stdout


# -- status ------------------------------------------------------------------------------------


def test_status_healthy_then_unhealthy_after_the_breaker_is_opened(app: Any) -> None:
    ok = run("status", "--json", *NO_WORKER)
    assert ok.exit_code == 0, ok.output
    assert doc(ok)["healthy"] is True and doc(ok)["problems"] == []
    assert {"breaker", "fallback_depth", "dead_letters", "spool_depth", "suppressed_duplicates", "queues",
            "broker", "credentials"} <= set(doc(ok))
    assert [p["name"] for p in doc(ok)["ignored"]] == ["queue_not_consumed"] * 3
    text = run("status", *NO_WORKER)
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == "cio_celery: healthy"
    assert "breaker                closed (trips 0)" in text.stdout
    assert "broker                 redis (publishing works)" in text.stdout

    opened = run("breaker", "open", "--yes", "--json")
    assert opened.exit_code == 0
    assert doc(opened)["before"] == "closed" and doc(opened)["after"] == "open"
    down = run("status", "--json", *NO_WORKER)
    assert down.exit_code == 1
    assert doc(down)["healthy"] is False and doc(down)["breaker"]["opened_by_hand"] is True
    assert [p["name"] for p in doc(down)["problems"]] == ["breaker_open"]
    assert "cio breaker close" in doc(down)["problems"][0]["fix"]
    text = run("status", *NO_WORKER)
    assert text.exit_code == 1 and "UNHEALTHY" in text.stdout and "opened by hand" in text.stdout
    assert "problem: breaker_open: " in text.stdout and "  fix: close it when ready" in text.stdout


def test_status_thresholds_and_counts(app: Any) -> None:
    add_dead_letter(app)
    Fallback(settings(app), app).park("identify", "p1", ["user-1"], {"_cio": {"key": "p1"}})
    data = doc(run("status", "--json", *NO_WORKER))
    assert data["dead_letters"] == 1 and data["fallback_depth"] == 1 and data["healthy"] is True
    over = run("status", "--max-dead-letters", "0", "--json", *NO_WORKER)
    assert over.exit_code == 1
    assert [(p["name"], p["message"]) for p in doc(over)["problems"]] == [
        ("dead_letters_over_threshold", "1 dead letters (more than 0)")]
    assert run("status", "--max-fallback-depth", "0", *NO_WORKER).exit_code == 1
    assert run("status", "--max-fallback-depth", "-1").exit_code == 2  # usage error
    assert run("status", "--ignore", "no_such_problem").exit_code == 2


def test_status_mentions_breaker_resets_and_judges_the_ledger_by_how_long_entries_stay_overdue(
    app: Any, cli_env: dict[str, str]
) -> None:
    s = settings(app)
    store = redis.Redis.from_url(s.redis_url)
    # A damaged breaker (a hand-edited hash): reset to closed by the next script, counted.
    store.hset(key(s, "breaker", "customerio"), mapping={"st": 0, "gen": "garbage"})
    reset = run("status", "--json", *NO_WORKER)
    assert reset.exit_code == 0, reset.output  # not a problem by itself: the breaker works again
    assert doc(reset)["breaker"]["corrupt_resets"] == 1 and doc(reset)["breaker"]["state"] == "closed"
    text = run("status", *NO_WORKER).stdout
    assert "breaker                closed (trips 0); reset 1 time because its shared state could not be read" in text

    # An operation in flight is in the delivery ledger (recorded in the background, then published).
    task_id = app.tasks["cio_celery.identify"].delay("user-ledger").id
    due = key(s, "ledger", "due")
    wait_until(lambda: store.zscore(due, task_id) is not None, what="the ledger record")
    data = doc(run("status", "--json", *NO_WORKER))
    assert data["ledger"] | {"oldest_overdue_seconds": 0} == {
        "depth": 1, "overdue": 0, "oldest_overdue_seconds": 0, "grace": 300.0, "max_overdue": 300.0}
    assert data["healthy"] is True
    assert "ledger                 1 in flight, 0 overdue" in run("status", *NO_WORKER).stdout
    # Seven minutes later (its due time moved back), with no releaser sweeping: overdue for 100 s
    # more than the grace.
    store.zadd(due, {task_id: time.time() - 400}, xx=True)
    late = run("status", "--json", *NO_WORKER)
    assert late.exit_code == 1
    [problem] = doc(late)["problems"]
    assert problem["name"] == "ledger_overdue"
    assert problem["message"].startswith("1 operation of the delivery ledger is overdue by more than 300 s")
    assert "fallback releaser" in problem["fix"] and "-Q cio,cio.send,cio.fallback" in problem["fix"]
    assert doc(late)["ledger"]["overdue"] == 1 and 395 < doc(late)["ledger"]["oldest_overdue_seconds"] < 460
    assert "ledger                 1 in flight, 1 overdue (the oldest by 7m)" in run("status", *NO_WORKER).stdout
    # Overdue, but not for longer than the threshold given: reported, not judged.
    lenient = run("status", "--max-ledger-overdue", "10m", "--json", *NO_WORKER)
    assert lenient.exit_code == 0 and doc(lenient)["ledger"]["overdue"] == 1
    assert run("status", "--max-ledger-overdue", "0", *NO_WORKER).exit_code == 2


# -- breaker -----------------------------------------------------------------------------------


def test_breaker_open_close_reset_print_old_and_new_state(app: Any) -> None:
    b = breaker_for(settings(app))
    opened = run("breaker", "open", "--for", "30", "--yes")
    assert opened.exit_code == 0 and opened.stdout.strip() == "breaker customerio: closed -> open for 30s"
    st = b.status()
    assert st.state == "open" and 25 < st.time_left <= 30
    closed = run("breaker", "close", "--yes")
    assert closed.exit_code == 0 and closed.stdout.strip() == "breaker customerio: open -> closed"
    assert b.status().state == "closed"

    by_hand = run("breaker", "open", "--yes", "--json")
    assert doc(by_hand)["opened_by_hand"] is True and doc(by_hand)["time_left"] is None
    assert b.status().time_left == -1
    reset = run("breaker", "reset", "--yes", "--json")
    assert reset.exit_code == 0
    assert doc(reset) | {"trips": 0} == {"action": "reset", "breaker": "customerio", "before": "open",
                                        "after": "closed", "time_left": None, "opened_by_hand": False,
                                        "trips": 0, "breaker_enabled": True}
    assert b.status().trips == 0
    assert run("breaker", "open", "--for", "1h", "--yes").stdout.strip().endswith("open for 3600s")
    assert run("breaker", "open", "--for", "0", "--yes").exit_code == 2
    assert run("breaker", "open", "--for", "soon", "--yes").exit_code == 2


def test_destructive_commands_refuse_without_yes_when_stdin_is_not_a_terminal(
    app: Any, cli_env: dict[str, str]
) -> None:
    b = breaker_for(settings(app))
    letter = add_dead_letter(app)
    for args in (["breaker", "open"], ["breaker", "close"], ["breaker", "reset"],
                 ["dead-letters", "replay", "--all"], ["dead-letters", "purge", letter]):
        refused = run(*args)
        assert refused.exit_code == 1, args
        assert "--yes" in refused.stderr and "Nothing was changed" in refused.stderr
        assert refused.stdout == ""
    refused = run("breaker", "open", "--json")
    assert refused.exit_code == 1 and doc(refused)["error"] == "not_confirmed"
    assert b.status().state == "closed"
    assert DeadLetters(settings(app), app).get(letter) is not None
    assert queued(cli_env, "cio") == []


def _on_a_terminal(env: dict[str, str], answer: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the command with a pseudo-terminal as stdin and type ``answer`` at the prompt."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.cli_app", "cio", *args],
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT), stdin=slave,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        os.close(slave)
        os.write(master, answer + b"\n")  # the terminal keeps the line until the prompt reads it
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_terminal_is_asked_and_no_means_nothing_changes(app: Any, cli_env: dict[str, str]) -> None:
    b = breaker_for(settings(app))
    declined = _on_a_terminal(cli_env, b"n", "breaker", "open")
    assert declined.returncode == 1, declined.stderr
    assert "Open it for every worker?" in declined.stderr and "aborted" in declined.stderr
    assert b.status().state == "closed"
    accepted = _on_a_terminal(cli_env, b"y", "breaker", "open")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip() == "breaker customerio: closed -> open until closed by hand"
    assert b.status().state == "open"


# -- dead letters --------------------------------------------------------------------------------


def test_dead_letters_list_filters_by_operation_and_age_without_customer_data(app: Any) -> None:
    empty = run("dead-letters", "list", "--json")
    assert empty.exit_code == 0 and doc(empty) == {"total": 0, "shown": 0, "entries": []}
    old = add_dead_letter(app, "identify", age=3 * 3600)
    new = add_dead_letter(app, "track")
    send = add_dead_letter(app, "send_email", reason="ambiguous:timeout", status=None)

    listed = run("dead-letters", "list", "--json")
    assert listed.exit_code == 0
    assert [e["id"] for e in doc(listed)["entries"]] == [old, new, send]  # oldest first
    first = doc(listed)["entries"][0]
    assert set(first) == {"id", "operation", "task_id", "reason", "status", "attempts", "failed_at", "age_seconds"}
    assert 3 * 3600 - 5 < first["age_seconds"] < 3 * 3600 + 5
    by_op = doc(run("dead-letters", "list", "--operation", "track", "--json"))
    assert [e["id"] for e in by_op["entries"]] == [new] and by_op["total"] == 3
    assert [e["id"] for e in doc(run("dead-letters", "list", "--older-than", "2h", "--json"))["entries"]] == [old]
    assert doc(run("dead-letters", "list", "--older-than", "4h", "--json"))["entries"] == []
    assert [e["id"] for e in doc(run("dead-letters", "list", "--limit", "2", "--json"))["entries"]] == [old, new]

    table = run("dead-letters", "list")
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["id", "operation", "reason", "status", "attempts", "age"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == [old, "identify", "http_400", "400", "1", "3.0h"]
    assert lines[4].split()[:4] == [send, "send_email", "ambiguous:timeout", "-"]
    assert lines[-1] == "3 shown of 3 dead letters"
    for out in (listed.stdout, table.stdout):
        assert EMAIL not in out and "user-1" not in out
    assert run("dead-letters", "list", "--operation", "trak").exit_code == 2
    assert run("dead-letters", "list", "--older-than", "2 hours").exit_code == 2


def test_dead_letters_show_hides_customer_data_unless_asked(app: Any) -> None:
    own_key = add_dead_letter(app, "identify")
    caller_key = add_dead_letter(app, "identify", key_=f"welcome-{EMAIL}")

    hidden = run("dead-letters", "show", own_key, "--json")
    assert hidden.exit_code == 0
    data = doc(hidden)
    assert data["id"] == own_key and data["reason"] == "http_400" and data["data_hidden"] is True
    assert data["args"] == "<1 arg hidden; --show-data shows them>" and data["kwargs"] == "<1 kwarg hidden>"
    assert data["meta"]["key"] == own_key  # the task id: not customer data
    text = run("dead-letters", "show", own_key)
    assert text.exit_code == 0 and "hidden" in text.stdout and f"id         {own_key}" in text.stdout
    for out in (hidden.stdout, text.stdout):
        assert EMAIL not in out and "user-1" not in out
    other = run("dead-letters", "show", caller_key)
    assert EMAIL not in other.stdout and '"key": "<hidden>"' in other.stdout

    shown = run("dead-letters", "show", caller_key, "--show-data", "--json")
    assert shown.exit_code == 0
    assert doc(shown)["args"] == ["user-1"] and doc(shown)["kwargs"] == {"email": EMAIL}
    assert doc(shown)["meta"]["key"] == f"welcome-{EMAIL}" and doc(shown)["data_hidden"] is False
    assert EMAIL in run("dead-letters", "show", caller_key, "--show-data").stdout

    missing = run("dead-letters", "show", "nope", "--json")
    assert missing.exit_code == 1 and doc(missing)["error"] == "not_found"


def test_dead_letters_replay_publishes_to_the_broker_with_the_same_key(app: Any, cli_env: dict[str, str]) -> None:
    a = add_dead_letter(app, "identify")
    b = add_dead_letter(app, "track")
    store = DeadLetters(settings(app), app)
    assert run("dead-letters", "replay", "--yes").exit_code == 2  # no selection
    assert run("dead-letters", "replay", a, "--all", "--yes").exit_code == 2  # two kinds of selection
    assert run("dead-letters", "replay", "--operation", "pageview", "--yes").exit_code == 1  # nothing matched

    replayed = run("dead-letters", "replay", "--operation", "identify", "--yes", "--json")
    assert replayed.exit_code == 0, replayed.output
    assert doc(replayed) == {"replayed": 1, "ids": [a], "skipped": [], "missing": []}
    [msg] = queued(cli_env, "cio")
    assert msg["task"] == "cio_celery.identify" and msg["args"] == ["user-1"]
    assert msg["kwargs"]["email"] == EMAIL and msg["kwargs"]["_cio"]["key"] == a  # same idempotency key
    assert store.get(a) is None and store.get(b) is not None

    by_id = run("dead-letters", "replay", b, "gone-id", "--yes")
    assert by_id.exit_code == 1  # one id was not found; the other was replayed
    assert by_id.stdout.splitlines() == ["replayed 1 dead letter", "not found: gone-id"]
    assert [m["task"] for m in queued(cli_env, "cio")] == ["cio_celery.track", "cio_celery.identify"]
    assert store.count() == 0
    assert run("dead-letters", "replay", "--all", "--yes").exit_code == 1  # nothing left

    # Arguments that fail validation stay invalid: the entry is skipped and kept.
    store.add(operation="identify", task_id="bad-1", reason="invalid:id", status=None, attempts=1,
              args=[""], kwargs={"_cio": {"key": "bad-1"}})
    skipped = run("dead-letters", "replay", "bad-1", "--yes", "--json")
    assert skipped.exit_code == 1
    assert doc(skipped) == {"replayed": 0, "ids": [], "skipped": [{"id": "bad-1", "why": "invalid id"}],
                            "missing": []}
    assert store.get("bad-1") is not None and len(queued(cli_env, "cio")) == 2


def test_dead_letters_purge_by_filter_ids_and_all(app: Any) -> None:
    old = add_dead_letter(app, "identify", age=8 * 86400)
    mid = add_dead_letter(app, "track", age=3600)
    new = [add_dead_letter(app, "send_email") for _ in range(3)]
    store = DeadLetters(settings(app), app)
    nothing = run("dead-letters", "purge", "--operation", "pageview", "--yes", "--json")
    assert nothing.exit_code == 1 and doc(nothing)["error"] == "nothing_matched"

    aged = run("dead-letters", "purge", "--older-than", "7d", "--yes", "--json")
    assert aged.exit_code == 0 and doc(aged) == {"purged": 1, "ids": [old], "missing": []}
    by_id = run("dead-letters", "purge", mid, "--yes")
    assert by_id.exit_code == 0 and by_id.stdout.strip() == "purged 1 dead letter"
    assert [e.id for e in store.list()] == new
    everything = run("dead-letters", "purge", "--all", "--yes", "--json")
    assert doc(everything)["purged"] == 3 and store.count() == 0


def test_a_real_dead_letter_is_replayed_and_delivered_by_a_worker(
    app: Any, cli_env: dict[str, str], fake: FakeCustomerIO, tmp_path: Path
) -> None:
    """A worker dead-letters a 400; the CLI (the installed entry point) replays it; the worker delivers."""
    env = {**cli_env, "CIO_SITE_ID": fake.site_id, "CIO_TRACK_API_KEY": fake.track_api_key,
           "CIO_APP_API_KEY": fake.app_api_key, "CIO_TRACK_URL": fake.url, "CIO_APP_URL": fake.url,
           "CIO_TIMEOUT": "2",
           # One request per operation: the scripted 400 must meet the identify itself, not a
           # batch it was coalesced into because a loaded machine made its message wait.
           "CIO_BATCH_COALESCE": "0"}
    worker = WorkerProcess(env, concurrency=1, name="cli", log_dir=tmp_path).start(cli_env["CELERY_BROKER_URL"])
    try:
        fake.fail_next(status=400)
        app.tasks["cio_celery.identify"].delay("user-e2e", email=EMAIL)
        store = DeadLetters(settings(app), app)
        [entry] = wait_until(lambda: store.list(), what="the 400 to be dead-lettered")
        listed = run_sub(env, "dead-letters", "list", "--operation", "identify", "--json")
        assert listed.returncode == 0 and doc(listed)["entries"][0]["reason"] == "http_400"
        assert EMAIL not in listed.stdout + listed.stderr

        replayed = run_sub(env, "dead-letters", "replay", entry.id, "--yes", "--json")
        assert replayed.returncode == 0, replayed.stderr
        assert doc(replayed)["replayed"] == 1
        [applied] = fake.wait_for_applied(1)
        assert applied.operation == "identify" and applied.customer_id == "user-e2e"
        assert store.count() == 0
        for secret in (fake.track_api_key, fake.app_api_key, EMAIL):
            assert secret not in replayed.stdout + replayed.stderr
    finally:
        worker.stop()


# -- the store's quarantine --------------------------------------------------------------------------


def test_quarantine_list_show_and_purge_without_customer_data(app: Any) -> None:
    s = settings(app)
    store = redis.Redis.from_url(s.redis_url)
    # A parked operation this version cannot read: the release moves it to the quarantine.
    fb = Fallback(s, app)
    store.lpush(key(s, "fallback", "ops"), b"\xff" + json.dumps({"email": EMAIL}).encode())
    assert fb.release(10) == 1 and fb.depth() == 0
    # A dead letter that cannot be read: listing the dead letters moves it (and does not crash).
    store.hset(key(s, "dlq", "items"), "broken", json.dumps({"kwargs": {"email": EMAIL}})[:-1])
    store.zadd(key(s, "dlq", "index"), {"broken": time.time()})
    listed = run("dead-letters", "list", "--json")
    assert listed.exit_code == 0 and doc(listed)["total"] == 0

    status = run("status", "--json", *NO_WORKER)
    assert status.exit_code == 1 and doc(status)["quarantine"] == 2
    [problem] = doc(status)["problems"]
    assert problem["name"] == "quarantine_not_empty" and problem["message"].startswith("2 store entries")
    assert "cio quarantine list" in problem["fix"]
    assert "quarantine (store)     2" in run("status", *NO_WORKER).stdout

    entries = run("quarantine", "list", "--json")
    assert entries.exit_code == 0
    assert doc(entries)["total"] == 2 and doc(entries)["shown"] == 2
    fallback_entry, letter = doc(entries)["entries"]  # oldest first
    assert set(letter) == {"id", "source", "why", "moved_at", "size", "age_seconds"}
    assert (fallback_entry["source"], fallback_entry["why"]) == ("fallback", "not JSON")
    assert (letter["id"], letter["source"]) == ("dead_letter:broken", "dead_letter")
    assert letter["why"].startswith("unreadable (")
    table = run("quarantine", "list")
    assert table.stdout.splitlines()[0].split() == ["id", "source", "why", "bytes", "age"]
    assert table.stdout.splitlines()[-1] == "2 shown of 2 quarantined entries"
    assert doc(run("quarantine", "list", "--limit", "1", "--json"))["shown"] == 1

    hidden = run("quarantine", "show", letter["id"], "--json")
    assert hidden.exit_code == 0 and doc(hidden)["data_hidden"] is True
    assert doc(hidden)["raw"] == f"<{letter['size']} bytes hidden; --show-data shows them>"
    text = run("quarantine", "show", letter["id"])
    assert f"id        {letter['id']}" in text.stdout and "bytes hidden" in text.stdout
    for out in (entries.stdout, table.stdout, hidden.stdout, text.stdout, status.stdout):
        assert EMAIL not in out
    shown = run("quarantine", "show", letter["id"], "--show-data", "--json")
    assert doc(shown)["raw_encoding"] == "utf-8" and EMAIL in doc(shown)["raw"]
    binary = doc(run("quarantine", "show", fallback_entry["id"], "--show-data", "--json"))
    assert binary["raw_encoding"] == "base64" and EMAIL in base64.b64decode(binary["raw"]).decode(errors="replace")
    missing = run("quarantine", "show", "nope", "--json")
    assert missing.exit_code == 1 and doc(missing)["error"] == "not_found"

    assert run("quarantine", "purge", "--yes").exit_code == 2  # no selection
    assert run("quarantine", "purge", letter["id"], "--all", "--yes").exit_code == 2  # two kinds
    refused = run("quarantine", "purge", letter["id"])
    assert refused.exit_code == 1 and "--yes" in refused.stderr
    assert doc(run("quarantine", "list", "--json"))["total"] == 2, "nothing changed"
    by_id = run("quarantine", "purge", letter["id"], "nope", "--yes", "--json")
    assert by_id.exit_code == 1  # one id was not found; the other was purged
    assert doc(by_id) == {"purged": 1, "ids": [letter["id"]], "missing": ["nope"]}
    everything = run("quarantine", "purge", "--all", "--yes")
    assert everything.exit_code == 0 and everything.stdout.strip() == "purged 1 quarantined entry"
    assert run("quarantine", "list").stdout.strip() == "the quarantine is empty"
    nothing = run("quarantine", "purge", "--all", "--yes", "--json")
    assert nothing.exit_code == 1 and doc(nothing)["error"] == "nothing_matched"
    assert run("status", *NO_WORKER).exit_code == 0


# -- fallback ----------------------------------------------------------------------------------


def test_fallback_release_respects_the_breaker_and_the_releaser_lease(app: Any, cli_env: dict[str, str]) -> None:
    s = settings(app)
    fb = Fallback(s, app)
    for i in range(3):
        fb.park("identify", f"p{i}", [f"user-{i}"], {"_cio": {"key": f"p{i}"}})
    b = breaker_for(s)
    b.open()
    refused = run("fallback", "release", "--json")
    assert refused.exit_code == 1 and doc(refused)["error"] == "breaker_not_closed"
    assert "breaker is open" in refused.stderr and fb.depth() == 3

    forced = run("fallback", "release", "--force", "--limit", "1", "--json")
    assert forced.exit_code == 0, forced.output
    assert doc(forced) == {"released": 1, "remaining": 2, "batched": False, "breaker": "open"}
    [single] = queued(cli_env, "cio.fallback")
    assert single["task"] == "cio_celery.identify" and single["id"] == "p0"

    b.close()
    assert fb.acquire_lease("a-worker-releaser", 30)  # what a running worker's releaser holds
    busy = run("fallback", "release", "--json")
    assert busy.exit_code == 1 and doc(busy)["error"] == "releaser_busy" and fb.depth() == 2
    fb.drop_lease("a-worker-releaser")

    released = run("fallback", "release")
    assert released.exit_code == 0
    assert released.stdout.strip() == "released 2 parked operations to cio.fallback (in batches); 0 remain"
    assert [m["task"] for m in queued(cli_env, "cio.fallback")] == ["cio_celery.deliver_batch", "cio_celery.identify"]
    assert fb.acquire_lease("next-releaser", 5)  # the command gave the lease back
    assert doc(run("fallback", "release", "--json"))["released"] == 0


# -- spool -------------------------------------------------------------------------------------


def web_app(cli_env: dict[str, str], broker_url: str) -> Celery:
    """The app a web process of this deployment runs: the CLI's app (same name, same broker URL,
    so the same spool on this host), in this process, publishing to ``broker_url``."""
    web = Celery("cio_cli_test", broker=broker_url, include=["cio_celery.tasks"], set_as_current=False)
    web.conf.update(cio_spool_dir=cli_env["CIO_SPOOL_DIR"], cio_redis_url=cli_env["CIO_REDIS_URL"],
                    cio_spool_flush_interval=3600, task_publish_retry=False, broker_connection_retry_on_startup=False,
                    broker_transport_options={"socket_connect_timeout": 0.5, "max_retries": 0})
    return web


def test_spool_flush_publishes_what_was_spooled_while_the_broker_was_down(
    app: Any, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A web process whose broker is down: .delay() returns and the operations wait in its spool.
    broker = RedisServer()
    port = broker.port
    broker_url = f"{broker.url}/0"
    env = {**cli_env, "CELERY_BROKER_URL": broker_url}
    down = web_app(cli_env, broker_url)
    with monkeypatch.context() as m:
        m.delenv("CELERY_BROKER_URL")  # Celery prefers it to the app's own broker URL
        ids = [down.tasks["cio_celery.identify"].delay(f"user-{i}", email=EMAIL).id for i in range(2)]
        publisher_for(down).stop()
    try:
        unhealthy = run_sub(env, "status", "--json", *NO_WORKER)
        assert unhealthy.returncode == 1 and doc(unhealthy)["spool_depth"] == 2
        assert "broker_unreachable" in [p["name"] for p in doc(unhealthy)["problems"]]

        broker = RedisServer(port=port, data_dir=str(tmp_path)).start()  # the broker is back
        flushed = run_sub(env, "spool", "flush", "--json")
        assert flushed.returncode == 0, flushed.stdout + flushed.stderr
        assert doc(flushed)["published"] == 2 and doc(flushed)["remaining"] == 0
        published = [json.loads(raw)["headers"]["id"] for raw in redis.Redis.from_url(broker_url).lrange("cio", 0, -1)]
        assert sorted(published) == sorted(ids)
        healthy = run_sub(env, "status", "--json", *NO_WORKER)
        assert healthy.returncode == 0 and doc(healthy)["spool_depth"] == 0
        again = run_sub(env, "spool", "flush")
        assert again.returncode == 0 and again.stdout.strip() == "the spool is empty"
    finally:
        broker.close()


def test_spool_flush_exits_1_when_rows_remain(app: Any, cli_env: dict[str, str]) -> None:
    # A row held by a publish still in flight in another process stays for that process.
    publisher_for(app).spool.put({"task": "cio_celery.identify", "args": ["user-1"],
                                  "kwargs": {"_cio": {"key": "k1"}}, "task_id": "k1",
                                  "options": {"queue": "cio"}}, hold=60)
    left = run("spool", "flush", "--json")
    assert left.exit_code == 1
    assert doc(left)["published"] == 0 and doc(left)["remaining"] == 1
    assert doc(left)["why"].startswith("1 operation held by a publish still in flight in a process of this host")
    text = run("spool", "flush").stdout.strip()
    assert text.startswith("published 0; 1 remain: 1 operation held by a publish still in flight")
    assert "run this again" in text


def test_spool_flush_with_the_broker_down_is_exit_3_and_keeps_the_spool(app: Any, cli_env: dict[str, str]) -> None:
    broker_url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    spool = publisher_for(web_app(cli_env, broker_url)).spool
    spool.put({"task": "cio_celery.identify", "args": ["user-1"], "kwargs": {"_cio": {"key": "k2"}},
               "task_id": "k2", "options": {"queue": "cio"}})
    down = run_sub({**cli_env, "CELERY_BROKER_URL": broker_url}, "spool", "flush", "--json")
    assert down.returncode == 3, down.stderr
    assert doc(down)["error"] == "broker_unavailable" and doc(down)["remaining"] == 1
    assert down.stderr.strip().startswith("cio: the broker is unreachable (")
    assert PASSWORD not in down.stdout + down.stderr
    assert spool.depth() == 1


def bad_row(task_id: str, **options: Any) -> dict[str, Any]:
    """A spooled message no broker takes (an older version spooled it with a bad option)."""
    return {"task": "cio_celery.identify", "args": ["bad-row-user"], "kwargs": {"_cio": {"key": task_id}},
            "task_id": task_id, "options": {"queue": "cio", "expires": "soon", **options}}


def test_spool_list_show_requeue_drop_and_flush_says_why_rows_remain(app: Any, cli_env: dict[str, str]) -> None:
    spool = spool_for(app)
    bad = spool.put(bad_row("bad-1"))
    good = spool.put({"task": "cio_celery.identify", "args": [EMAIL], "kwargs": {"plan": "secret-plan",
                      "_cio": {"key": "good-1"}}, "task_id": "good-1",
                      "options": {"queue": "cio", "headers": {"h": EMAIL}, "link": {"task": "t", "args": [EMAIL]}}})
    assert run("spool", "list").stdout.splitlines()[0].split() == [
        "id", "state", "operation", "task_id", "attempts", "last_error", "size", "age"]
    listed = run("spool", "list", "--json")
    assert listed.exit_code == 0
    data = doc(listed)
    assert [(r["id"], r["state"], r["task_id"]) for r in data["rows"]] == [(bad, "pending", "bad-1"),
                                                                          (good, "pending", "good-1")]
    assert (data["pending"], data["held"], data["quarantined"], data["cap"]) == (2, 0, 0, 256 * 1024 * 1024)
    assert data["bytes"] == sum(r["size"] for r in data["rows"])
    hidden = run("spool", "show", str(good), "--json")
    assert hidden.exit_code == 0 and doc(hidden)["data_hidden"] is True
    assert doc(hidden)["args"] == "<1 arg hidden>" and doc(hidden)["kwargs"] == "<1 kwarg hidden>"
    assert doc(hidden)["options"] == {"queue": "cio", "link": "<hidden>"}
    text = run("spool", "show", str(good))
    assert "args       <1 arg hidden; --show-data shows them>" in text.stdout
    for out in (listed.stdout, hidden.stdout, text.stdout, run("spool", "list").stdout):
        assert EMAIL not in out and "secret-plan" not in out and "bad-row-user" not in out
    shown = doc(run("spool", "show", str(good), "--show-data", "--json"))
    assert shown["args"] == [EMAIL] and shown["kwargs"] == {"plan": "secret-plan"}
    assert shown["meta"] == {"key": "good-1"}
    missing = run("spool", "show", "999", "--json")
    assert missing.exit_code == 1 and doc(missing)["error"] == "not_found"
    assert run("spool", "show", "x").exit_code == 2

    # The good row is published; the bad one fails with the broker answering, and says so.
    first = run("spool", "flush", "--json")
    assert first.exit_code == 1
    assert {k: doc(first)[k] for k in ("published", "quarantined", "remaining", "in_quarantine")} == {
        "published": 1, "quarantined": 0, "remaining": 1, "in_quarantine": 0}
    assert doc(first)["why"].startswith("1 operation failed to publish with the broker answering")
    assert [m["id"] for m in queued(cli_env, "cio")] == ["good-1"]
    for _ in range(3):
        assert run("spool", "flush").exit_code == 1
    last = run("spool", "flush")  # the fifth failure (spool_max_attempts): quarantined
    assert last.exit_code == 1
    assert last.stdout.startswith("published 0; 1 quarantined; 0 remain: the spool's quarantine holds 1 operation")
    assert "cio spool list" in last.stdout
    only = run("spool", "flush", "--json")
    assert only.exit_code == 1 and doc(only)["in_quarantine"] == 1 and doc(only)["published"] == 0
    [row] = doc(run("spool", "list", "--json"))["rows"]
    assert (row["id"], row["state"], row["attempts"], row["last_error"]) == (bad, "quarantined", 5, "ValueError")

    status = run("status", "--json", *NO_WORKER)
    assert status.exit_code == 1 and doc(status)["spool_quarantined"] == 1
    [problem] = doc(status)["problems"]
    assert problem["name"] == "spool_quarantine_not_empty" and "cio spool list" in problem["fix"]
    assert "spool (this host)      0 waiting, 1 quarantined, " in run("status", *NO_WORKER).stdout

    # Back to the pending rows (a new id at the end), then dropped for good.
    requeued = run("spool", "requeue", str(bad), "999", "--json")
    assert requeued.exit_code == 1  # 999 is not a row
    assert doc(requeued) == {"requeued": 1, "ids": [bad], "skipped": [], "missing": [999]}
    [again] = doc(run("spool", "list", "--json"))["rows"]
    assert (again["state"], again["attempts"], again["task_id"]) == ("pending", 0, "bad-1") and again["id"] > good
    not_quarantined = run("spool", "requeue", str(again["id"]), "--json")
    assert not_quarantined.exit_code == 1
    assert doc(not_quarantined)["skipped"] == [{"id": again["id"], "why": "not quarantined (pending)"}]
    refused = run("spool", "drop", str(again["id"]))
    assert refused.exit_code == 1 and "--yes" in refused.stderr and len(list_rows(app)) == 1
    dropped = run("spool", "drop", str(again["id"]), "--yes")
    assert dropped.exit_code == 0 and dropped.stdout.strip() == "dropped 1 spooled operation"
    assert run("spool", "list").stdout.strip() == "the spool is empty"
    gone = run("spool", "drop", str(again["id"]), "--yes", "--json")
    assert gone.exit_code == 1 and doc(gone)["error"] == "nothing_matched"
    assert run("spool", "drop", "--yes").exit_code == 2  # an id is required
    assert run("status", *NO_WORKER).exit_code == 0


def test_a_spool_near_its_byte_cap_is_named_by_status(
    app: Any, cli_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web process whose broker is down spools big operations up to 80 % of spool_max_bytes."""
    broker_url = f"redis://127.0.0.1:{free_port()}/0"
    web = web_app(cli_env, broker_url)
    web.conf.cio_spool_max_bytes = 1024 * 1024
    big = {f"attr_{i}": "x" * 900 for i in range(100)}  # ~92 KB of attributes per identify
    with monkeypatch.context() as m:
        m.delenv("CELERY_BROKER_URL")  # Celery prefers it to the app's own broker URL
        for i in range(10):
            web.tasks["cio_celery.identify"].delay(f"user-{i}", **big)
        publisher_for(web).stop()
    env = {**cli_env, "CELERY_BROKER_URL": broker_url, "CIO_SPOOL_MAX_BYTES": str(1024 * 1024)}
    done = run_sub(env, "status", "--json", *NO_WORKER)
    assert done.returncode == 1, done.stderr
    data = doc(done)
    assert data["spool_depth"] == 10 and data["spool_max_bytes"] == 1024 * 1024
    assert 0.8 * 1024 * 1024 <= data["spool_bytes"] < 1024 * 1024
    [near] = [p for p in data["problems"] if p["name"] == "spool_near_full"]
    assert near["message"].startswith(f"this host's spool holds {data['spool_bytes']} of 1048576 bytes (")
    assert "CIO_SPOOL_MAX_BYTES" in near["fix"]
    assert "broker_unreachable" in [p["name"] for p in data["problems"]]
    text = run_sub(env, "status", *NO_WORKER).stdout
    assert "spool (this host)      10 waiting, 0 quarantined, " in text and "of 1.0 MiB (" in text
    # Below 80 %: not named.
    lower = run_sub({**env, "CIO_SPOOL_MAX_BYTES": str(2 * 1024 * 1024)}, "status", "--json", *NO_WORKER)
    assert "spool_near_full" not in [p["name"] for p in doc(lower)["problems"]]


# -- unreachable store, bad configuration ---------------------------------------------------------


def test_store_unreachable_is_exit_3_without_the_password(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CIO_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"}
    listed = run_sub(env, "dead-letters", "list")
    assert listed.returncode == 3, listed.stderr
    assert listed.stderr.strip() == "cio: the store is unreachable (ConnectionError)"
    status = run_sub(env, "status", "--json", *NO_WORKER)
    assert status.returncode == 3
    [problem] = doc(status)["problems"]
    assert doc(status)["healthy"] is False and problem["name"] == "store_unavailable"
    assert problem["message"] == "the store (Redis) does not answer (ConnectionError)"
    assert "CIO_REDIS_URL" in problem["fix"]
    opened = run_sub(env, "breaker", "open", "--yes", "--json")
    assert opened.returncode == 3 and doc(opened)["error"] == "store_unavailable"
    for result in (listed, status, opened):
        assert PASSWORD not in result.stdout + result.stderr
        assert "redis://" not in result.stdout + result.stderr and "Traceback" not in result.stderr


def test_a_bad_setting_is_exit_2_naming_the_setting_not_its_value(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "CIO_REDIS_URL": f"http://user:{PASSWORD}@example.invalid/0"}
    bad = run_sub(env, "dead-letters", "list")
    assert bad.returncode == 2
    assert bad.stderr.startswith("cio: configuration error: CIO_REDIS_URL must be a redis://"), bad.stderr
    # status reports it as a named problem (exit 1), with the other sections it could still read.
    status = run_sub(env, "status", "--json", *NO_WORKER)
    assert status.returncode == 1, status.stderr
    [problem] = doc(status)["problems"]
    assert problem["name"] == "configuration_invalid" and problem["message"].startswith("CIO_REDIS_URL must be")
    assert doc(status)["broker"]["publish_ok"] is True
    for result in (bad, status):
        assert PASSWORD not in result.stdout + result.stderr and "Traceback" not in result.stderr
