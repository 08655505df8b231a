"""The health report tells the truth, through real processes: `celery worker` subprocesses, the
installed `celery ... cio status` entry point, a real Redis (one made to refuse writes), the fake
Customer.io. Each finding of issue 13 is a named problem with its fix, exit 1 from `cio status`,
and a warning at the worker's start.

The broker and the store are databases 9 and 8 of the test redis-server (nobody else's), the
spool a folder of this module.
"""

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
from celery import Celery

from cio_celery.breaker import Breaker
from cio_celery.fallback import Fallback
from cio_celery.health import PROBLEM_NAMES, forget_workers, health_report
from cio_celery.ledger import Ledger
from cio_celery.settings import Settings, configure, settings_for_app
from cio_celery.spool import publisher_for
from cio_celery.store import key
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.helpers import wait_until
from tests.workers import WorkerProcess

ROOT = Path(__file__).resolve().parent.parent
SECRET = "trk-SECRET-health-never-printed"
EMAIL = "ada-health@example.com"
# Where a worker must answer: a loaded machine (CI) can take more than the default 1 s.
ANSWER = ("--inspect-timeout", "5")

# Real worker subprocesses, several per test: in the README's test command (CI), not in the tox corners.
pytestmark = pytest.mark.slow


@pytest.fixture()
def env(redis_base_url: str, tmp_path: Path, fake: FakeCustomerIO) -> Iterator[dict[str, str]]:
    """What a deployment's processes share: broker, store, spool, credentials, the fake's URL."""
    values = {
        "CELERY_BROKER_URL": f"{redis_base_url}/9",
        "CIO_REDIS_URL": f"{redis_base_url}/8",
        "CIO_SPOOL_DIR": str(tmp_path / "spool"),
        "CIO_SITE_ID": fake.site_id,
        "CIO_TRACK_API_KEY": fake.track_api_key,
        "CIO_APP_API_KEY": fake.app_api_key,
        "CIO_TRACK_URL": fake.url,
        "CIO_APP_URL": fake.url,
        "CIO_TIMEOUT": "2",
    }
    for url in (values["CELERY_BROKER_URL"], values["CIO_REDIS_URL"]):
        redis.Redis.from_url(url).flushdb()
    yield values
    for url in (values["CELERY_BROKER_URL"], values["CIO_REDIS_URL"]):
        redis.Redis.from_url(url).flushdb()


def clean_environ(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CIO_", "CELERY_"))}
    return {**base, **extra, "PYTHONPATH": str(ROOT)}


def cio(env: dict[str, str], *args: str, extra_path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m celery -A tests.cli_app cio ARGS`: the installed entry point, in its own process."""
    environ = clean_environ(**env)
    if extra_path:
        environ["PYTHONPATH"] = os.pathsep.join([extra_path, str(ROOT)])
    return subprocess.run([sys.executable, "-m", "celery", "-A", "tests.cli_app", "cio", *args],
                          env=environ, cwd=str(ROOT), capture_output=True, text=True, timeout=90, check=False)


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in done.stderr, done.stderr
    return json.loads(done.stdout)


def names(data: dict[str, Any]) -> list[str]:
    return [p["name"] for p in data["problems"]]


def start_worker(env: dict[str, str], tmp_path: Path, name: str, queues: str = "cio,cio.send,cio.fallback",
                 **extra: str) -> WorkerProcess:
    environ = {**env, **extra}
    for var in [k for k, v in extra.items() if v == ""]:
        environ.pop(var)  # "" means: this worker does not have the variable at all
    worker = WorkerProcess({}, concurrency=1, name=name, queues=queues, log_dir=tmp_path)
    worker.env = clean_environ(**environ)
    return worker.start(env["CELERY_BROKER_URL"])


def worker_says(worker: WorkerProcess, text: str, timeout: float = 20) -> str:
    return wait_until(lambda: text in worker.tail(400) and worker.tail(400), timeout=timeout,
                      what=f"the worker to log {text!r}")


def enqueue_app(env: dict[str, str], broker: str | None = None, **cio: Any) -> Celery:
    """A web process's app (this process) publishing to the deployment's broker: the app the CLI
    loads too (same name and broker, so the same spool file on this host)."""
    app = Celery("cio_cli_test", broker=broker or env["CELERY_BROKER_URL"],
                 include=["cio_celery.tasks"], set_as_current=False)
    app.conf.update(broker_transport_options={"socket_connect_timeout": 1, "socket_timeout": 1},
                    broker_connection_retry_on_startup=False, task_publish_retry=False)
    configure(app, Settings(redis_url=env["CIO_REDIS_URL"], spool_dir=env["CIO_SPOOL_DIR"],
                            site_id="s", track_api_key="t", app_api_key="a", spool_flush_interval=3600, **cio))
    return app


# -- no worker consumes the queues ----------------------------------------------------------


def test_status_is_unhealthy_until_a_worker_consumes_the_three_queues(env: dict[str, str], tmp_path: Path) -> None:
    web = enqueue_app(env)
    web.tasks["cio_celery.identify"].delay("user-waiting")
    publisher_for(web).stop()
    alone = cio(env, "status", "--json")
    assert alone.returncode == 1, alone.stdout + alone.stderr
    data = report(alone)
    assert names(data) == ["queue_not_consumed"] * 3
    assert [p["message"] for p in data["problems"]] == [
        "no worker consumes queue 'cio' (1 operations waiting)", "no worker consumes queue 'cio.send'",
        "no worker consumes queue 'cio.fallback'"]
    assert all("-Q cio,cio.send,cio.fallback" in p["fix"] for p in data["problems"])
    assert data["queues"]["cio"] == {"depth": 1, "consumers": 0, "workers": []}  # read from the broker

    # A worker started without -Q consumes Celery's default queue only: it says so, and health too.
    wrong = start_worker(env, tmp_path, "noq", queues="celery")
    try:
        log = worker_says(wrong, "CIO_FALLBACK_QUEUE")
        assert "queue 'cio' is not consumed by this worker" in log
        assert "start workers with -Q cio,cio.send,cio.fallback" in log
        assert "queue 'cio.send' is not consumed by this worker" in log
        still = report(cio(env, "status", "--json", *ANSWER))
        assert names(still) == ["queue_not_consumed"] * 3
        text = cio(env, "status")
        assert text.returncode == 1
        assert "problem: queue_not_consumed: no worker consumes queue 'cio'" in text.stdout
        assert "  fix: start workers with -Q cio,cio.send,cio.fallback" in text.stdout
    finally:
        wrong.stop()

    right = start_worker(env, tmp_path, "both")
    try:
        ok = cio(env, "status", "--json", *ANSWER)
        data = report(ok)
        assert ok.returncode == 0, data["problems"]
        assert data["queues"]["cio"]["consumers"] == 1 and data["queues"]["cio"]["workers"][0].startswith("both@")
        assert data["queues"]["cio.fallback"]["consumers"] == 1 and data["queues"]["cio.send"]["consumers"] == 1
        assert data["credentials"] == {"track": True, "app": True, "source": "workers"}
        log = right.tail(400)
        for warned in ("CIO_QUEUE", "CIO_SEND_QUEUE", "CIO_FALLBACK_QUEUE", "credentials_missing", "broker_"):
            assert warned not in log  # nothing of that to warn about
    finally:
        right.stop()


# -- credentials missing for an operation family ------------------------------------------------


def test_missing_credentials_are_named_at_start_in_health_and_replayed_by_reason(
    env: dict[str, str], tmp_path: Path, fake: FakeCustomerIO
) -> None:
    worker = start_worker(env, tmp_path, "nocreds", CIO_SITE_ID="")
    try:
        log = worker_says(worker, "track_credentials_missing")
        assert "CIO_SITE_ID is not set" in log and "set CIO_SITE_ID where the workers run" in log
        # The CLI has every credential; the report is about the workers that deliver.
        done = cio(env, "status", "--json", *ANSWER)
        assert done.returncode == 1
        [problem] = report(done)["problems"]
        assert problem["name"] == "track_credentials_missing"
        assert problem["message"].startswith("CIO_SITE_ID is not set on nocreds@")
        assert "--reason not_configured" in problem["fix"]
        assert report(done)["credentials"]["source"] == "workers"

        web = enqueue_app(env)
        web.tasks["cio_celery.identify"].delay("user-nocreds", email="ada@example.com")
        web.tasks["cio_celery.track"].delay("user-nocreds", "refused", {})
        listed = wait_until(lambda: report(cio(env, "dead-letters", "list", "--reason", "not_conf", "--json"))
                            ["shown"] == 2 and True, timeout=20, what="two not_configured dead letters")
        assert listed
    finally:
        worker.stop()
    publisher_for(web).stop()
    # Another reason is not selected by the prefix.
    assert cio(env, "dead-letters", "replay", "--reason", "http_", "--yes").returncode == 1

    fixed = start_worker(env, tmp_path, "fixed")
    try:
        replayed = cio(env, "dead-letters", "replay", "--reason", "not_configured", "--yes", "--json")
        assert replayed.returncode == 0, replayed.stderr
        assert report(replayed)["replayed"] == 2
        applied = fake.wait_for_applied(2, timeout=20)
        # Alone, or as batch items when their messages waited (a loaded machine).
        alone = {"batch:event": "track", "batch:identify": "identify"}
        assert sorted(alone.get(a.operation, a.operation) for a in applied) == ["identify", "track"]
        assert cio(env, "status", *ANSWER).returncode == 0
    finally:
        fixed.stop()


# -- configuration invalid -----------------------------------------------------------------------


def test_an_invalid_variable_is_named_at_worker_start_and_by_status(env: dict[str, str], tmp_path: Path) -> None:
    done = cio({**env, "CIO_TIMEOUT": "abc", "CIO_TRACK_API_KEY": SECRET}, "status", "--json")
    assert done.returncode == 1
    data = report(done)
    assert "configuration_invalid" in names(data)
    [problem] = [p for p in data["problems"] if p["name"] == "configuration_invalid"]
    assert problem["message"] == "CIO_TIMEOUT cannot be parsed (ValueError)"
    assert SECRET not in done.stdout + done.stderr

    worker = start_worker(env, tmp_path, "badtimeout", CIO_TIMEOUT="abc")
    try:
        log = worker_says(worker, "CIO_TIMEOUT")
        assert "cio_celery configuration: CIO_TIMEOUT: cannot be parsed (ValueError) (error)" in log
    finally:
        worker.stop()


# -- the broker answers but publishing fails ---------------------------------------------------


def test_a_broker_that_refuses_writes_is_named_and_the_spool_turns_stale(env: dict[str, str], tmp_path: Path) -> None:
    with RedisServer() as broker:
        broker_url = f"{broker.url}/0"
        full = redis.Redis.from_url(broker_url)
        full.config_set("maxmemory", "1")  # noeviction: every write is refused (OOM), reads work
        web = enqueue_app(env, broker=broker_url)
        web.tasks["cio_celery.identify"].delay("user-oom")  # returns: the operation waits in the spool
        publisher_for(web).stop()
        time.sleep(1.2)
        done = cio({**env, "CELERY_BROKER_URL": broker_url}, "status", "--max-spool-age", "1", "--json")
        assert done.returncode == 1
        data = report(done)
        assert {"broker_publish_failing", "spool_stale"} <= set(names(data))
        [failing] = [p for p in data["problems"] if p["name"] == "broker_publish_failing"]
        assert failing["message"].startswith("the broker answers but refuses this process's writes (")
        assert data["broker"] == {"transport": "redis", "reachable": True, "publish_ok": False}
        [stale] = [p for p in data["problems"] if p["name"] == "spool_stale"]
        assert stale["message"].startswith("1 operations wait in this host's spool")
        full.config_set("maxmemory", "0")
        healthy_broker = report(cio({**env, "CELERY_BROKER_URL": broker_url}, "status", "--json"))
        assert "broker_publish_failing" not in names(healthy_broker)


def test_a_transport_that_cannot_be_imported_is_named_with_the_install_fix(env: dict[str, str], tmp_path: Path) -> None:
    """The issue's plain install: kombu's Redis transport without `packaging` (shadowed here)."""
    shadow = tmp_path / "shadow" / "packaging"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'packaging'\", name='packaging')\n")
    done = cio(env, "status", "--json", extra_path=str(shadow.parent))
    assert done.returncode == 1, done.stdout + done.stderr
    data = report(done)
    [problem] = [p for p in data["problems"] if p["name"] == "broker_publish_failing"]
    assert "ModuleNotFoundError: No module named 'packaging'" in problem["message"]
    assert "pip install 'celery[redis]'" in problem["fix"]
    assert data["broker"]["reachable"] is True
    # What Flask's init_app and manage.py check (E010) run: the same finding, before any traffic.
    check = subprocess.run(
        [sys.executable, "-c", "from tests.cli_app import app; from cio_celery.checks import check_configuration\n"
         "for p in check_configuration(app): print(p)"],
        env={**clean_environ(**env), "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(ROOT)])},
        cwd=str(ROOT), capture_output=True, text=True, timeout=60, check=False,
    )
    assert "broker_url: the broker's transport 'redis' cannot be loaded (ModuleNotFoundError" in check.stdout, (
        check.stdout + check.stderr)


# -- the store's quarantine and the delivery ledger ----------------------------------------------


def test_an_unreadable_parked_entry_is_quarantined_by_a_worker_and_named_until_purged(
    env: dict[str, str], tmp_path: Path, fake: FakeCustomerIO
) -> None:
    web = enqueue_app(env)
    settings = settings_for_app(web)
    Fallback(settings, web).park("identify", "parked-1", ["user-parked"], {"_cio": {"key": "parked-1"}})
    # In front of it, an entry this version cannot read (a half-applied upgrade, a foreign writer).
    redis.Redis.from_url(env["CIO_REDIS_URL"]).lpush(key(settings, "fallback", "ops"),
                                                     b"\xff" + json.dumps({"email": EMAIL}).encode())
    worker = start_worker(env, tmp_path, "releaser", CIO_FALLBACK_RELEASE_INTERVAL="0.2")
    try:
        [applied] = fake.wait_for_applied(1, timeout=30)  # the one behind it flows on
        assert applied.customer_id == "user-parked"
        done = cio(env, "status", "--json", *ANSWER)
        assert done.returncode == 1, done.stdout + done.stderr
        data = report(done)
        [problem] = data["problems"]
        assert problem["name"] == "quarantine_not_empty" and data["quarantine"] == 1
        assert problem["message"].startswith("1 store entry that could not be read")
        assert "celery -A proj cio quarantine list" in problem["fix"]
        [entry] = report(cio(env, "quarantine", "list", "--json"))["entries"]
        assert (entry["source"], entry["why"]) == ("fallback", "not JSON")
        purged = cio(env, "quarantine", "purge", entry["id"], "--yes")
        assert purged.returncode == 0 and purged.stdout.strip() == "purged 1 quarantined entry"
        healthy = cio(env, "status", "--json", *ANSWER)
        assert healthy.returncode == 0, report(healthy)["problems"]
        for out in (done, purged, healthy):
            assert EMAIL not in out.stdout + out.stderr
    finally:
        worker.stop()
        publisher_for(web).stop()


def test_ledger_overdue_is_named_while_no_worker_sweeps_and_gone_once_one_does(
    env: dict[str, str], tmp_path: Path, fake: FakeCustomerIO
) -> None:
    """An operation lost in transit (popped from its queue and recorded nowhere, as at a Redis
    restart between kombu's BRPOP and its unacknowledged record) waits in the ledger, due after
    the grace (5 s here). With no worker to sweep it, health names it once it stayed overdue
    longer than --max-ledger-overdue; a worker's releaser then republishes it and it is delivered."""
    web = enqueue_app(env, visibility_timeout=5.0)
    task_id = web.tasks["cio_celery.track"].delay("user-lost", "in_transit", {}).id
    publisher_for(web).stop()
    ledger = Ledger(settings_for_app(web))
    assert ledger.grace == 5
    wait_until(lambda: ledger.depth() == 1, what="the ledger record")
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    lost = json.loads(broker.rpop("cio"))  # type: ignore[arg-type]
    assert lost["headers"]["id"] == task_id and broker.llen("cio") == 0
    status = ("status", "--max-ledger-overdue", "1", "--ignore", "queue_not_consumed")

    def overdue() -> subprocess.CompletedProcess[str] | None:
        done = cio(env, *status, "--json")
        return done if "ledger_overdue" in names(report(done)) else None

    done = wait_until(overdue, timeout=60, interval=0.5, what="ledger_overdue")
    assert done.returncode == 1
    data = report(done)
    assert names(data) == ["ledger_overdue"]
    assert data["ledger"]["depth"] == 1 and data["ledger"]["overdue"] == 1
    assert data["ledger"]["oldest_overdue_seconds"] > 1 and data["ledger"]["max_overdue"] == 1
    [problem] = data["problems"]
    assert problem["message"].startswith("1 operation of the delivery ledger is overdue by more than 1 s")
    assert "-Q cio,cio.send,cio.fallback" in problem["fix"]
    text = cio(env, *status)
    assert "ledger                 1 in flight, 1 overdue (the oldest by " in text.stdout

    worker = start_worker(env, tmp_path, "sweeper", CIO_TEST_VISIBILITY="5", CIO_FALLBACK_RELEASE_INTERVAL="0.2")
    try:
        [applied] = fake.wait_for_applied(1, timeout=30)
        # Delivered alone or as an item of a batch, depending on how the sweeper republishes.
        assert applied.operation in {"track", "batch:event"} and applied.customer_id == "user-lost"
        wait_until(lambda: ledger.depth() == 0, what="the delivered operation to leave the ledger")
        healthy = cio(env, "status", "--max-ledger-overdue", "1", "--json", *ANSWER)
        assert healthy.returncode == 0, report(healthy)["problems"]
        assert (report(healthy)["ledger"]["depth"], report(healthy)["ledger"]["overdue"]) == (0, 0)
        assert "ledger republished 1 operations" in worker.log_text()
    finally:
        worker.stop()


# -- never raises, whatever the store holds ---------------------------------------------------------


def test_corrupt_store_keys_are_named_problems_never_a_traceback(env: dict[str, str]) -> None:
    settings = Settings(redis_url=env["CIO_REDIS_URL"], spool_dir=env["CIO_SPOOL_DIR"], site_id="s",
                        track_api_key="t", app_api_key="a")
    client = redis.Redis.from_url(env["CIO_REDIS_URL"])
    client.set(key(settings, "fallback", "ops"), "not a list")
    client.set(key(settings, "dlq", "index"), "not a sorted set")
    client.hset(key(settings, "stats"), "suppressed:identify", "many")
    for name in client.keys(f"{{{settings.key_prefix}}}:breaker*"):
        client.delete(name)
    client.set(key(settings, "breaker", Breaker(settings).name), "not a hash")
    client.set(key(settings, "quarantine", "index"), "not a sorted set")
    client.hset(key(settings, "ledger", "due"), "task", "not a sorted set")
    app = Celery("corrupt", broker=env["CELERY_BROKER_URL"], set_as_current=False)
    configure(app, settings)
    found = health_report(app, check_workers=False)
    assert not found.healthy and found.store_up
    unreadable = {"fallback_unreadable", "dead_letters_unreadable", "stats_unreadable", "quarantine_unreadable",
                  "ledger_unreadable"}
    assert unreadable <= set(found.problem_names)
    assert set(found.problem_names) <= set(PROBLEM_NAMES)
    # The breaker's damaged state was reset (counted), not reported as a problem.
    assert found.breaker is not None and found.breaker["state"] == "closed" and found.breaker["corrupt_resets"] == 1
    # The CLI prints the report, exit 1, no traceback.
    done = cio(env, "status", "--json", "--ignore", "queue_not_consumed")
    assert done.returncode == 1
    assert unreadable <= set(names(report(done)))


def test_workers_answers_are_cached_and_forgotten_on_demand(env: dict[str, str], tmp_path: Path) -> None:
    app = enqueue_app(env)
    t0 = time.monotonic()
    first = health_report(app, inspect_timeout=0.5, workers_cache=30)
    asked = time.monotonic() - t0
    t1 = time.monotonic()
    second = health_report(app, inspect_timeout=0.5, workers_cache=30)
    assert time.monotonic() - t1 < asked  # no second broadcast
    assert first.problem_names == second.problem_names == ["queue_not_consumed"] * 3
    worker = start_worker(env, tmp_path, "cached")
    try:
        assert health_report(app, inspect_timeout=0.5, workers_cache=30).problem_names == second.problem_names
        forget_workers(app)
        assert health_report(app, inspect_timeout=5.0, workers_cache=30).healthy
    finally:
        worker.stop()
        publisher_for(app).stop()
