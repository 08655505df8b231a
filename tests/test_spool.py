"""The enqueue path when the broker is down: bounded wait, nothing raised, a durable local
spool flushed in order once the broker is back, without duplicates."""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import cio_celery  # noqa: F401 - registers the shared tasks
from cio_celery import EnqueueError, ValidationError
from cio_celery.spool import Spool, flush_spool, publisher_for, spool_depth
from cio_celery.testing.redis_server import RedisServer, free_port

SECRET = "s3cretpw"


def make_app(broker: str, spool_dir: Path, name: str | None = None, **cio: Any) -> Celery:
    """An app of its own (a unique main name unless ``name`` says which app this process runs)."""
    app = Celery(name or f"spooltest-{time.monotonic_ns()}", broker=broker, set_as_current=False)
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


def queued_ids(url: str, queue: str = "cio") -> list[str]:
    """Task ids in the broker's queue, oldest first (kombu LPUSHes, consumers BRPOP)."""
    client = redis.Redis.from_url(url)
    raws = client.lrange(queue, 0, -1)
    client.close()
    return [json.loads(raw)["headers"]["id"] for raw in reversed(raws)]


@pytest.fixture()
def down_url() -> str:
    """A broker URL (with a password) on a loopback port nothing listens on."""
    return f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"


@pytest.fixture()
def black_hole() -> Iterator[str]:
    """A broker that accepts TCP connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                held.append(conn)
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"redis://127.0.0.1:{server.getsockname()[1]}/0"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


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


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


# -- the SQLite file ------------------------------------------------------------------


def test_spool_keeps_order_and_is_private(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "sp"))
    ids = [spool.put({"n": i}) for i in range(5)]
    assert ids == sorted(ids)
    assert [r.entry["n"] for r in spool.peek()] == [0, 1, 2, 3, 4]
    assert spool.depth() == 5
    age = spool.oldest_age()
    assert age is not None and age >= 0
    spool.delete(ids[0])
    assert [r.entry["n"] for r in spool.peek(2)] == [1, 2]
    assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(spool.directory).st_mode) == 0o700
    # Durable: a second connection (another process would do the same) sees the rows.
    assert Spool(str(tmp_path / "sp")).depth() == 4
    empty = Spool(str(tmp_path / "empty"))
    assert empty.oldest_age() is None


def test_hold_and_unhold(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path))
    row = spool.put({"n": 1}, hold=30)
    assert spool.peek()[0].hold_until > time.time() + 20
    spool.unhold(row)
    assert spool.peek()[0].hold_until == 0


def test_one_flusher_at_a_time(tmp_path: Path) -> None:
    a, b = Spool(str(tmp_path)), Spool(str(tmp_path))
    with a.flush_lock() as got_a:
        assert got_a
        with b.flush_lock() as got_b:
            assert not got_b
    with b.flush_lock() as got_b:
        assert got_b


# -- delay() with the broker down -----------------------------------------------------


def test_delay_with_broker_down_spools_and_raises_nothing(down_url: str, tmp_path: Path, all_logs: Any) -> None:
    app = make_app(down_url, tmp_path)
    track = app.tasks["cio_celery.track"]
    result = track.delay("user-secret-id", "signed_up", {"plan": "pro"})
    assert result.id
    assert spool_depth(app) == 1
    # Once the gate is closed, the next ones go straight to the spool.
    results = [track.delay("user-secret-id", "ev", {"i": i}) for i in range(20)]
    assert spool_depth(app) == 21
    rows = publisher_for(app).spool.peek(100)
    assert [r.entry["task_id"] for r in rows] == [result.id] + [r.id for r in results]
    entry = rows[0].entry
    assert entry["task"] == "cio_celery.track"
    assert entry["options"]["queue"] == "cio"
    assert entry["kwargs"]["_cio"]["key"] == result.id
    # The broker URL and its password appear nowhere in what was logged.
    text = "\n".join(all_logs.texts)
    assert "spooled locally" in text
    assert SECRET not in text and "user-secret-id" not in text


def test_validation_errors_still_raise_with_broker_down(down_url: str, tmp_path: Path) -> None:
    app = make_app(down_url, tmp_path)
    with pytest.raises(ValidationError, match="name must not be blank"):
        app.tasks["cio_celery.track"].delay("u1", "")
    assert spool_depth(app) == 0


def test_raise_mode(down_url: str, tmp_path: Path) -> None:
    app = make_app(down_url, tmp_path, on_broker_error="raise")
    with pytest.raises(EnqueueError) as info:
        app.tasks["cio_celery.identify"].delay("u1", plan="pro")
    assert info.value.operation == "identify"
    assert not info.value.spooled
    assert SECRET not in str(info.value) and "127.0.0.1" not in str(info.value)
    assert spool_depth(app) == 0


def test_spool_failure_is_an_enqueue_error(down_url: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    app = make_app(down_url, blocker / "spool")
    with pytest.raises(EnqueueError) as info:
        app.tasks["cio_celery.track"].delay("u1", "ev")
    assert not info.value.spooled
    assert "local spool failed" in info.value.reason


def test_hanging_broker_returns_within_the_bound(black_hole: str, tmp_path: Path) -> None:
    app = make_app(black_hole, tmp_path, enqueue_timeout=0.3)
    track = app.tasks["cio_celery.track"]
    started = time.monotonic()
    track.delay("u1", "ev")
    elapsed = time.monotonic() - started
    # The bound is 0.3 s plus a spool write; allow a generous margin for a loaded machine.
    assert elapsed < 2.0, elapsed
    rows = publisher_for(app).spool.peek()
    assert len(rows) == 1
    # The publish is still in flight: its row is held so nothing flushes it twice.
    assert rows[0].hold_until > time.time()
    # When the in-flight publish gives up (socket timeout), the hold is released.
    wait_for(lambda: publisher_for(app).spool.peek()[0].hold_until == 0, timeout=30)


# -- the broker comes back ------------------------------------------------------------


def test_spool_flushes_in_order_when_broker_returns(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = make_app(url, tmp_path)
    track = app.tasks["cio_celery.track"]
    ids = [track.delay("u1", "ev", {"i": i}).id for i in range(30)]
    assert spool_depth(app) == 30
    with RedisServer(port=port):
        wait_for(lambda: spool_depth(app) == 0)
        assert queued_ids(url) == ids
        # The gate is open again: the next one goes straight to the broker.
        assert publisher_for(app).gate_open
        later = track.delay("u1", "ev").id
        assert queued_ids(url) == [*ids, later]
        assert spool_depth(app) == 0


def test_leftovers_of_another_process_go_first(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    dead = make_app(url, tmp_path, "web", spool_flush_interval=3600.0)
    left = [dead.tasks["cio_celery.identify"].delay(f"u{i}").id for i in range(3)]
    publisher_for(dead).stop()
    with RedisServer(port=port):
        fresh = make_app(url, tmp_path, "web")  # the same app in another process
        new = fresh.tasks["cio_celery.identify"].delay("u9").id
        wait_for(lambda: spool_depth(fresh) == 0)
        assert queued_ids(url) == [*left, new]


def test_flush_spool_on_demand(tmp_path: Path) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    app = make_app(url, tmp_path, spool_flush_interval=3600.0)
    ids = [app.tasks["cio_celery.track"].delay("u1", "ev").id for _ in range(5)]
    # Wait for the first publish (timed out, still in flight) to give up and free its row.
    wait_for(lambda: publisher_for(app).spool.peek()[0].hold_until == 0, timeout=30)
    # Broker still down: the flush raises and keeps everything.
    with pytest.raises(Exception):  # whichever error kombu raises
        flush_spool(app)
    assert spool_depth(app) == 5
    with RedisServer(port=port):
        result = flush_spool(app)
        assert (result.published, result.remaining) == (5, 0)
        assert queued_ids(url) == ids
        assert publisher_for(app).gate_open


def test_countdown_becomes_an_absolute_eta(down_url: str, tmp_path: Path) -> None:
    app = make_app(down_url, tmp_path)
    app.tasks["cio_celery.track"].apply_async(("u1", "ev"), countdown=30)
    options = publisher_for(app).spool.peek()[0].entry["options"]
    assert "countdown" not in options and options["eta"].startswith("20")
