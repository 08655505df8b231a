"""The spool under hostile or careless use: only a broker outage is spooled, one bad row never
stalls the others, two apps on one host never share rows, files stay private, and a full spool
refuses at the call instead of losing anything."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import cio_celery  # noqa: F401 - registers the shared tasks
from cio_celery import ConfigurationError, EnqueueError, ValidationError
from cio_celery.spool import (
    Spool,
    drop_row,
    flush_spool,
    held_depth,
    list_rows,
    publisher_for,
    quarantine_depth,
    requeue_row,
    show_row,
    spool_depth,
    spool_file,
    spool_for,
    spool_stats,
    spool_usage,
)
from cio_celery.testing.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "broker-pw-S3CRET"
EMAIL = "ada.lovelace@example.com"


def make_app(broker: str, spool_dir: Path, name: str | None = None, **cio: Any) -> Celery:
    app = Celery(name or f"hostile-spool-{time.monotonic_ns()}", broker=broker, set_as_current=False)
    cio = {"spool_flush_interval": 0.1, "site_id": "site", "track_api_key": "trk-key", **cio}
    app.conf.update(
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=1.0,
        broker_transport_options={"socket_connect_timeout": 1.0, "socket_timeout": 1.0},
        cio_spool_dir=str(spool_dir),
        **{f"cio_{k}": v for k, v in cio.items()},
    )
    app.loader.import_default_modules()
    return app


def queued(url: str, queue: str = "cio") -> list[dict[str, Any]]:
    """Messages in a queue, oldest first, as (task id, first arg)."""
    client = redis.Redis.from_url(url)
    raws = client.lrange(queue, 0, -1)
    client.close()
    return [json.loads(raw) for raw in reversed(raws)]


def queued_ids(url: str, queue: str = "cio") -> list[str]:
    return [m["headers"]["id"] for m in queued(url, queue)]


@pytest.fixture(autouse=True)
def _stop_new_publishers() -> Iterator[None]:
    """Stop the publishers (flusher threads) a test started: a flusher left retrying a down
    broker would publish, and fire Celery's publish signals, during later tests."""
    from cio_celery import spool

    before = {id(p) for p in spool._PUBLISHERS.values()}
    yield
    for publisher in spool._PUBLISHERS.values():
        if id(publisher) not in before:
            publisher.stop()


def wait_for(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not met in {timeout}s")


@pytest.fixture()
def live_url(redis_base_url: str) -> Iterator[str]:
    """A healthy broker on a database no test worker consumes."""
    url = f"{redis_base_url}/9"
    redis.Redis.from_url(url).flushdb()
    yield url
    redis.Redis.from_url(url).flushdb()


@pytest.fixture()
def down_url() -> str:
    return f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"


def stop(*apps: Celery) -> None:
    for app in apps:
        publisher_for(app).stop()


# -- only a broker outage is spooled ------------------------------------------------------------

# Options that fail Celery's or kombu's publish whatever the broker does.
FAILING_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"expires": "soon"}, "expires"),
    ({"countdown": "10"}, "countdown"),
    ({"compression": "bogus"}, "compression"),
    ({"compression": "zstd"}, "compression"),  # kombu knows it; its library is not installed here
    ({"headers": ["x"]}, "headers"),
]
# Options a healthy broker takes but a worker cannot use (eta="tomorrow" is discarded by the
# worker's consumer). With the broker down they are refused before the spool takes them; with it
# up, CioTask.apply_async must call spool.check_options (tasks.py, see the report).
PUBLISHED_BAD_OPTIONS: list[tuple[dict[str, Any], str]] = [
    ({"eta": "tomorrow"}, "eta"),
    ({"priority": "high"}, "priority"),
    ({"time_limit": "long"}, "time_limit"),
]
CASES = [(o, n, b) for o, n in FAILING_OPTIONS for b in ("healthy", "down")] + [
    (o, n, "down") for o, n in PUBLISHED_BAD_OPTIONS
]


@pytest.mark.parametrize(("options", "option", "broker"), CASES, ids=[f"{b}-{n}-{o.get(n)}" for o, n, b in CASES])
def test_a_bad_publish_option_raises_at_the_call_and_nothing_is_spooled(
    live_url: str, down_url: str, tmp_path: Path, options: dict[str, Any], option: str, broker: str
) -> None:
    app = make_app(live_url if broker == "healthy" else down_url, tmp_path)
    identify = app.tasks["cio_celery.identify"]
    if broker == "down":
        identify.delay("before")  # closes the gate: the next calls go to the spool without a publish
        assert spool_depth(app) == 1
    with pytest.raises(ValidationError) as info:
        identify.apply_async(("u1",), {"email": EMAIL}, **options)
    assert info.value.field == option
    assert EMAIL not in str(info.value)
    if broker == "healthy":
        assert spool_depth(app) == 0 and publisher_for(app).gate_open
        good = identify.delay("u2").id
        assert queued_ids(live_url) == [good], "the next call goes straight to the broker"
    else:
        assert spool_depth(app) == 1, "the bad call was not spooled"
    stop(app)


@pytest.mark.parametrize("broker", ["healthy", "down"])
def test_an_unencodable_publish_raises_naming_the_option(
    live_url: str, down_url: str, tmp_path: Path, broker: str
) -> None:
    app = make_app(live_url if broker == "healthy" else down_url, tmp_path)
    with pytest.raises(ValidationError) as info:
        app.tasks["cio_celery.identify"].apply_async(("u1",), headers={"x": {1, 2}})
    assert (info.value.field, info.value.problem) == (
        "headers", "is not JSON-serialisable, so the message could not be kept in the spool"
    )
    assert spool_depth(app) == 0 and publisher_for(app).gate_open
    stop(app)


def test_an_import_error_inside_kombu_raises_naming_the_module(tmp_path: Path, live_url: str) -> None:
    """A real process whose kombu Redis transport cannot import ``packaging`` (finding 3)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["packaging"] = None  # an environment without it: import fails inside kombu
        from celery import Celery
        import cio_celery
        from cio_celery import EnqueueError
        from cio_celery.spool import spool_depth
        app = Celery("importerr", broker={live_url!r}, set_as_current=False)
        app.conf.update(cio_spool_dir={str(tmp_path)!r}, cio_site_id="s", cio_track_api_key="k",
                        broker_connection_retry_on_startup=False)
        app.loader.import_default_modules()
        try:
            app.tasks["cio_celery.identify"].delay("u1")
        except EnqueueError as exc:
            print("RAISED", exc.reason, "spooled", exc.spooled)
        print("DEPTH", spool_depth(app))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RAISED publishing needs 'packaging" in out.stdout, out.stdout + out.stderr
    assert "which cannot be imported (ModuleNotFoundError); nothing was spooled" in out.stdout
    assert "spooled False" in out.stdout and "DEPTH 0" in out.stdout


def test_a_broker_outage_is_still_spooled(down_url: str, tmp_path: Path, all_logs: Any) -> None:
    app = make_app(down_url, tmp_path)
    app.tasks["cio_celery.identify"].delay("u1", email=EMAIL)
    assert spool_depth(app) == 1
    assert SECRET not in "\n".join(all_logs.texts)
    stop(app)


# -- one bad row never stalls the spool ------------------------------------------------------


def bad_entry(app: Celery, task_id: str, **options: Any) -> dict[str, Any]:
    """A row an older version (or a caller before this fix) left: it can never be published."""
    return {"task": "cio_celery.identify", "args": ["bad-row-user"], "kwargs": {"_cio": {"key": task_id}},
            "task_id": task_id, "options": {"queue": "cio", **options}}


@pytest.mark.parametrize("options", [{"expires": "soon"}, {"compression": "zstd"}, {"serializer": "bogus"}],
                         ids=["ValueError", "KeyError-as-connection-error", "SerializerNotInstalled"])
def test_a_row_that_keeps_failing_is_quarantined_and_the_others_flow_past(
    live_url: str, tmp_path: Path, options: dict[str, Any]
) -> None:
    app = make_app(live_url, tmp_path, "web", spool_max_attempts=3)
    spool = spool_for(app)
    spool.put(bad_entry(app, "bad-1", **options))
    # The web app, broker healthy, finds the leftover and queues its own operations behind it.
    started = time.monotonic()
    ids = [app.tasks["cio_celery.identify"].delay(f"u{i}").id for i in range(5)]
    wait_for(lambda: quarantine_depth(app) == 1 and spool_depth(app) == 0, what="bad row quarantined")
    elapsed = time.monotonic() - started
    assert queued_ids(live_url) == ids, "every good operation published, in order"
    assert elapsed < 10, elapsed
    wait_for(lambda: publisher_for(app).gate_open, what="gate open again")
    later = app.tasks["cio_celery.identify"].delay("u9").id
    assert queued_ids(live_url)[-1] == later and spool_depth(app) == 0
    [row] = list_rows(app)
    assert (row.task_id, row.state, row.attempts, row.operation) == ("bad-1", "quarantined", 3, "identify")
    assert row.last_error is not None and row.last_error.isidentifier()
    stop(app)


def test_a_failing_flush_with_the_broker_down_counts_no_attempt(down_url: str, tmp_path: Path) -> None:
    app = make_app(down_url, tmp_path, spool_flush_interval=3600.0, spool_max_attempts=1)
    for i in range(3):
        app.tasks["cio_celery.identify"].delay(f"u{i}")
    wait_for(lambda: all(r.state == "pending" for r in list_rows(app)), timeout=30, what="holds released")
    for _ in range(3):
        with pytest.raises(Exception):  # whichever error kombu raises
            flush_spool(app)
    assert [r.attempts for r in list_rows(app)] == [0, 0, 0]
    assert quarantine_depth(app) == 0 and spool_depth(app) == 3
    stop(app)


# -- what an operator sees --------------------------------------------------------------------


def test_operator_functions_list_show_requeue_and_drop_without_customer_data(
    live_url: str, tmp_path: Path
) -> None:
    app = make_app(live_url, tmp_path, spool_max_attempts=1, spool_flush_interval=3600.0)
    spool = spool_for(app)
    bad = spool.put(bad_entry(app, "bad-2", expires="soon"))
    good_entry = {"task": "cio_celery.identify", "args": [EMAIL], "kwargs": {"plan": "secret-plan",
                  "_cio": {"key": "g1"}}, "task_id": "good-1", "options": {"queue": "cio", "headers": {"h": EMAIL}}}
    good = spool.put(good_entry)
    rows = list_rows(app)
    assert [(r.id, r.state, r.operation) for r in rows] == [(bad, "pending", "identify"), (good, "pending", "identify")]
    listing = json.dumps([r.as_dict() for r in rows])
    assert EMAIL not in listing and "secret-plan" not in listing and "bad-row-user" not in listing

    shown = show_row(app, good)
    assert shown is not None and shown["args"] == "<1 arg hidden>" and shown["kwargs"] == "<1 kwarg hidden>"
    assert EMAIL not in json.dumps(shown) and "secret-plan" not in json.dumps(shown)
    full = show_row(app, good, show_data=True)
    assert full is not None and full["args"] == [EMAIL] and full["kwargs"] == {"plan": "secret-plan"}
    assert show_row(app, 10_000) is None

    result = flush_spool(app)
    assert (result.published, result.quarantined, result.remaining) == (1, 1, 0)
    assert [r.state for r in list_rows(app)] == ["quarantined"]
    assert requeue_row(app, bad) and not requeue_row(app, bad)
    [requeued] = list_rows(app)
    assert (requeued.state, requeued.attempts, requeued.task_id) == ("pending", 0, "bad-2")
    assert drop_row(app, requeued.id) and not drop_row(app, requeued.id)
    assert list_rows(app) == [] and spool_usage(app).bytes == 0
    stop(app)


def test_spool_stats_tell_held_and_failing_rows_apart(live_url: str, tmp_path: Path) -> None:
    """What `cio spool flush` says about the rows a flush leaves: held by a publish in flight,
    failing with the broker answering, quarantined; and show_row hides linked signatures."""
    app = make_app(live_url, tmp_path, spool_max_attempts=2, spool_flush_interval=3600.0)
    spool = spool_for(app)
    bad = spool.put(bad_entry(app, "bad-3", expires="soon"))
    held = spool.put(bad_entry(app, "held-1") | {"options": {"queue": "cio", "link": {"task": "t", "args": [EMAIL]}}},
                     hold=30)
    stats = spool_stats(app)
    assert (stats.depth, stats.held, stats.failing, stats.quarantined) == (2, 1, 0, 0)
    assert stats.hold_left is not None and 25 < stats.hold_left <= 30
    assert held_depth(app) == 1
    result = flush_spool(app)  # the bad row fails (broker answering), then the held one stops the pass
    assert (result.published, result.quarantined, result.remaining) == (0, 0, 2)
    stats = spool_stats(app)
    assert (stats.depth, stats.held, stats.failing) == (2, 1, 1)
    shown = show_row(app, held)
    assert shown is not None and shown["options"] == {"queue": "cio", "link": "<hidden>"}
    assert EMAIL not in json.dumps(shown)
    spool.unhold(held)  # the publish in flight failed: the row goes back to the flusher
    result = flush_spool(app)
    assert (result.published, result.quarantined, result.remaining) == (1, 1, 0)
    stats = spool_stats(app)
    assert (stats.depth, stats.held, stats.failing, stats.quarantined, stats.hold_left) == (0, 0, 0, 1, None)
    assert [r.task_id for r in list_rows(app)] == ["bad-3"] and list_rows(app)[0].id == bad
    assert queued_ids(live_url) == ["held-1"]
    stop(app)


# -- the spool belongs to one app and broker ----------------------------------------------------


def test_two_apps_on_one_host_with_one_broker_down_share_nothing(tmp_path: Path) -> None:
    """A misbehaving neighbour: app A's broker is down while app B's is healthy; same host, same
    spool directory. B never publishes A's rows; A's rows reach A's broker once it is back."""
    a_port = free_port()
    a_url = f"redis://:{SECRET}@127.0.0.1:{a_port}/0"
    spool_dir = tmp_path / "shared-spool"
    # App A runs in its own process: it enqueues while its broker is down, then exits.
    script = textwrap.dedent(f"""
        from celery import Celery
        import cio_celery
        from cio_celery.spool import publisher_for, spool_depth
        app = Celery("shop", broker={a_url!r}, set_as_current=False)
        app.conf.update(cio_spool_dir={str(spool_dir)!r}, cio_site_id="a", cio_track_api_key="ka",
                        cio_spool_flush_interval=3600, broker_connection_retry_on_startup=False,
                        task_publish_retry=False,
                        broker_transport_options={{"socket_connect_timeout": 0.5, "max_retries": 0}})
        app.loader.import_default_modules()
        ids = [app.tasks["cio_celery.identify"].delay("a-user-%d" % i, email="a%d@example.com" % i).id
               for i in range(3)]
        print(" ".join(ids))
        print(spool_depth(app))
        publisher_for(app).stop()
    """)
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**env, "PYTHONPATH": str(ROOT)}, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    a_ids, a_depth = out.stdout.split("\n")[:2]
    assert a_depth == "3"
    with RedisServer() as b_server:
        b_url = f"{b_server.url}/0"
        # App B: another app on the host, healthy broker. Same main name too, so only the
        # broker tells them apart.
        for b in (make_app(b_url, spool_dir), make_app(b_url, spool_dir, "shop")):
            assert spool_depth(b) == 0 and list_rows(b) == []
            assert flush_spool(b).published == 0
            b_id = b.tasks["cio_celery.identify"].delay("b-user").id
            wait_for(lambda b=b: spool_depth(b) == 0)
            stop(b)
            assert queued_ids(b_url)[-1] == b_id
        assert not any("a-user" in json.dumps(m) for m in queued(b_url)), "A's rows crossed into B's broker"
        assert len(queued(b_url)) == 2
    files = sorted(p.name for p in spool_dir.iterdir() if p.suffix == ".db")
    assert len(files) >= 2 and not any(SECRET in name for name in files)
    # A's broker comes back; A (a new process of the same app) flushes its own rows there.
    with RedisServer(port=a_port):
        redis.Redis(port=a_port).config_set("requirepass", SECRET)
        a = make_app(a_url, spool_dir, "shop")
        assert spool_depth(a) == 3
        result = flush_spool(a)
        assert (result.published, result.remaining) == (3, 0)
        assert queued_ids(a_url) == a_ids.split()
        stop(a)


def test_a_spool_file_of_another_owner_is_refused(tmp_path: Path, down_url: str) -> None:
    app = make_app(down_url, tmp_path, "shop")
    path = spool_file(app)
    directory, name = os.path.split(path)
    Spool(directory, name[:-3], owner="someone-else|redis://other/0").close()
    with pytest.raises(EnqueueError):  # the spool cannot take the message: refused, not mixed in
        app.tasks["cio_celery.identify"].delay("u1")
    with pytest.raises(ConfigurationError) as info:
        spool_for(app)
    assert info.value.setting == "spool_dir" and "belongs to another app or broker" in info.value.problem


def test_the_file_name_holds_no_password_and_differs_per_app_and_broker(tmp_path: Path) -> None:
    names = {
        spool_file(make_app(url, tmp_path, main))
        for main in ("shop", "billing")
        for url in (f"redis://:{SECRET}@h:6379/0", "redis://h:6379/1", "amqp://u:pw@h//")
    }
    assert len(names) == 6
    assert not any(SECRET in n or "pw" in os.path.basename(n) for n in names)
    # The password alone does not make another broker.
    assert spool_file(make_app("redis://:a@h:1/0", tmp_path, "x")) == spool_file(make_app("redis://:b@h:1/0",
                                                                                           tmp_path, "x"))


# -- private files --------------------------------------------------------------------------------


def test_existing_loose_modes_are_tightened_wal_and_shm_included(tmp_path: Path, down_url: str) -> None:
    directory = tmp_path / "loose"
    app = make_app(down_url, directory, "shop")
    app.tasks["cio_celery.identify"].delay("u1", email=EMAIL)
    stop(app)
    spool_for(app).close()
    path = spool_file(app)
    # Another process holds the database open, so its -wal and -shm files exist.
    holder = sqlite3.connect(path)
    holder.execute("SELECT COUNT(*) FROM spool").fetchall()
    files = [path, path + "-wal", path + "-shm", path[:-3] + ".lock"]
    assert all(os.path.exists(p) for p in files[:3])
    for p in files:
        if os.path.exists(p):
            os.chmod(p, 0o666)
    os.chmod(directory, 0o777)
    try:
        fresh = make_app(down_url, directory, "shop")
        assert spool_for(fresh).depth() == 1
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        for p in files[:3]:
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, p
        with spool_for(fresh).flush_lock() as locked:  # what every flush takes first
            assert locked
        assert stat.S_IMODE(os.stat(files[3]).st_mode) == 0o600
        stop(fresh)
    finally:
        holder.close()


def test_a_shared_sticky_directory_is_refused_not_chmodded(tmp_path: Path, down_url: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    app = make_app(down_url, shared)
    with pytest.raises(ConfigurationError) as info:
        spool_for(app)
    assert info.value.setting == "spool_dir"
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777


def test_a_symlinked_spool_file_is_refused(tmp_path: Path, down_url: str) -> None:
    app = make_app(down_url, tmp_path / "s", "shop")
    os.makedirs(tmp_path / "s", mode=0o700)
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    os.symlink(target, spool_file(app))
    with pytest.raises(ConfigurationError):
        spool_for(app)


# -- the byte cap --------------------------------------------------------------------------------


def test_a_full_spool_refuses_at_the_call_and_loses_nothing(down_url: str, tmp_path: Path) -> None:
    cap = 1024 * 1024
    app = make_app(down_url, tmp_path, spool_max_bytes=cap)
    identify = app.tasks["cio_celery.identify"]
    accepted = []
    with pytest.raises(EnqueueError) as info:
        for i in range(1000):
            accepted.append(identify.delay(f"user-{i}", bio="x" * 900, notes="y" * 900).id)
    assert not info.value.spooled
    assert "the local spool is full" in info.value.reason and "spool_max_bytes" in info.value.reason
    used, limit = spool_usage(app)
    assert limit == cap and cap - 3000 < used <= cap
    assert spool_depth(app) == len(accepted) and 400 < len(accepted) < 600
    assert [r.task_id for r in list_rows(app)] == accepted, "every accepted operation is still there, in order"
    # Room again once rows leave (flushed, or dropped by an operator): the next call is spooled.
    drop_row(app, list_rows(app)[0].id)
    identify.delay("after-drop")
    assert spool_depth(app) == len(accepted)
    stats = spool_stats(app)
    assert (stats.bytes, stats.cap, stats.quarantined) == (spool_usage(app).bytes, cap, 0)
    stop(app)


def test_spool_stats_never_creates_the_spool(tmp_path: Path, down_url: str) -> None:
    app = make_app(down_url, tmp_path / "none")
    assert spool_stats(app).depth == 0 and spool_usage(app) == (0, 256 * 1024 * 1024)
    assert not (tmp_path / "none").exists()
