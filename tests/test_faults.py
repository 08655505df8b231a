"""Fault injection at every store command, in the spirit of SQLite's I/O-error tests.

For each scenario (a delivery, a retry, a dead letter, a park, a send whose outcome is in doubt,
a batch, a batch with a refused item, a parked batch) a clean run first records the Redis
commands the worker sends to the store, through a proxy (tests/resp_proxy.py). Then the
scenario runs once for each k and each fault mode: the k-th command is dropped (a
ConnectionError), answered with an error (a ResponseError), or the worker process is SIGKILLed
just before it reaches Redis or just after. The commands are enumerated by the recording run,
so a store call added to the delivery path is covered without editing this test.

Every operation must end delivered or dead-lettered, never dropped; an event delivered twice
must be one Customer.io drops by its event id (the fake does, and counts them); a transactional
send is never applied twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from celery import Celery

from cio_celery import coalesce as coalesce_module
from cio_celery import fallback as fallback_module
from cio_celery import ledger as ledger_module
from cio_celery.breaker import Breaker
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from cio_celery.ulid import new_ulid
from tests.chaos_harness import report
from tests.helpers import applied_by_seq
from tests.resp_proxy import Fault, RespProxy
from tests.workers import WorkerProcess, worker_env

pytestmark = [pytest.mark.slow]

# The README's test command (and CI) runs one fault per command: a SIGKILL just after the command
# ran (the one that found both defects). CIO_FULL=1 (or CIO_FAULT_MODES=all) runs the four:
# a dropped connection, an error reply, a SIGKILL before and after the command (docs/chaos.md
# gives their figures); CIO_FAULT_MODES=drop,kill_after picks some.
FULL = os.environ.get("CIO_FULL") == "1" or os.environ.get("CIO_FAULTS_FULL") == "1"
_MODES = os.environ.get("CIO_FAULT_MODES", "all" if FULL else "kill_after")
MODES = ("drop", "error", "kill", "kill_after") if _MODES == "all" else tuple(_MODES.split(","))
# "delivered" and "batch_delivered" are the tails of "retried_after_503" and
# "batch_parked_while_open" (same commands): they run in the full run only.

ENV = {
    "CIO_TEST_VISIBILITY": "10",
    "CIO_TIMEOUT": "0.5",
    "CIO_TASK_TIME_LIMIT": "2",
    "CIO_IDEMPOTENCY_LEASE": "1",
    "CIO_MAX_RETRIES": "3",
    "CIO_RETRY_BACKOFF_BASE": "0.05",
    "CIO_RETRY_BACKOFF_MAX": "0.2",
    "CIO_RATE_LIMIT_TRACK": "1000",
    "CIO_RATE_LIMIT_TRANSACTIONAL": "1000",
    # The releaser never runs by itself here: the test releases parked operations, so that
    # the commands of a run are the operation's own.
    "CIO_FALLBACK_RELEASE_INTERVAL": "3600",
}


@dataclass
class Rig:
    fake: FakeCustomerIO
    server: RedisServer
    proxy: RespProxy
    worker: WorkerProcess
    producer: Celery
    broker: redis.Redis
    store: redis.Redis

    def kill_worker_process(self) -> None:
        for pid in self.worker.child_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def reset(self) -> None:
        self.store.flushdb()
        self.fake.clear_faults()
        self.fake.clear()

    def quiet(self) -> bool:
        b = self.broker
        return (all(b.llen(q) == 0 for q in ("cio", "cio.send", "cio.fallback")) and b.hlen("unacked") == 0
                and self.worker.proc is not None and len(self.worker.child_pids()) >= 1)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from make_rig(tmp_path_factory, "faults", ENV)


@pytest.fixture(scope="module")
def coalescing_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    # A linger of 1 ms: every message counts as late, so every batchable operation goes through
    # the batching buffer, the drainer and a batch task.
    yield from make_rig(tmp_path_factory, "faults-coalesce", {**ENV, "CIO_BATCH_LINGER": "0.001",
                                                              "CIO_BATCH_MIN_SIZE": "1"})


def make_rig(tmp_path_factory: pytest.TempPathFactory, name: str, env_extra: dict[str, str]) -> Iterator[Rig]:
    with ExitStack() as stack:
        server = stack.enter_context(RedisServer(appendonly=True))
        fake = stack.enter_context(FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak"))
        # Background work on its own clock: the batching drainer's ticks (its lease, and a script
        # reading the buffer's length, age and the time) and the delivery ledger's writer. Every
        # delivery path's own command is a script, a HINCRBY or a pipeline of scripts, and is counted.
        background = tuple(hashlib.sha1(text.encode()).hexdigest()[:8].encode()
                           for text in (fallback_module._RENEW, ledger_module._RECORD,
                                        getattr(ledger_module, "_WRITE", ""), coalesce_module._PEEK))
        proxy = RespProxy(server.port, ignore_names=frozenset({b"LLEN", b"GET", b"TIME"}),
                          ignore_scripts=background)
        stack.callback(proxy.close)
        broker_url = f"{server.url}/0"
        store_direct = f"{server.url}/1"
        env = worker_env(fake, broker_url, f"redis://127.0.0.1:{proxy.port}/1", **env_extra)
        worker = WorkerProcess(env, concurrency=1, name=name, log_dir=tmp_path_factory.mktemp("fault-logs"))
        producer = Celery("faults-producer", broker=broker_url, set_as_current=False)
        conf = {k.lower(): v for k, v in env.items() if k.startswith("CIO_") and not k.startswith("CIO_TEST")}
        conf["cio_redis_url"] = store_direct
        conf["cio_spool_dir"] = str(tmp_path_factory.mktemp("fault-spool"))
        producer.conf.update(conf, broker_connection_retry_on_startup=True)
        import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

        producer.finalize(auto=True)
        worker.start(broker_url)
        stack.callback(worker.stop, 20)
        rig = Rig(fake, server, proxy, worker, producer, redis.Redis.from_url(broker_url),
                  redis.Redis.from_url(store_direct))
        proxy.on_kill = rig.kill_worker_process
        yield rig


# -- scenarios: each enqueues its operations and says what they are ----------------------------


def _track(rig: Rig, seqs: list[int]) -> None:
    for seq in seqs:
        rig.producer.tasks["cio_celery.track"].delay(f"user-{seq}", "fault", {"seq": seq})


def _batch(rig: Rig, seqs: list[int]) -> None:
    entries = []
    for seq in seqs:
        tid = str(uuid.uuid4())
        entries.append({"operation": "track", "task_id": tid,
                        "args": [f"user-{seq}", "fault", {"seq": seq}, new_ulid(), None],
                        "kwargs": {"_cio": {"key": tid, "enqueued_at": time.time()}}})
    rig.producer.tasks["cio_celery.deliver_batch"].apply_async(args=[entries], queue="cio.fallback")


def _open_breaker(rig: Rig) -> None:
    Breaker(settings_for_app(rig.producer)).open()


@dataclass(frozen=True)
class Scenario:
    name: str
    enqueue: Callable[[Rig, list[int]], None]
    seqs: tuple[int, ...] = (1,)
    setup: Callable[[Rig], None] | None = None
    operation: str = "track"


SCENARIOS = [
    Scenario("delivered", _track),
    Scenario("retried_after_503", _track, setup=lambda r: r.fake.fail_next(1, status=503)),
    Scenario("dead_lettered_after_400", _track, setup=lambda r: r.fake.fail_next(1, status=400)),
    Scenario("parked_while_open", _track, setup=_open_breaker),
    Scenario("send_in_doubt", lambda r, seqs: [
        r.producer.tasks["cio_celery.send_email"].delay(
            {"transactional_message_id": 1, "identifiers": {"id": f"user-{s}"}, "message_data": {"seq": s}})
        for s in seqs], setup=lambda r: r.fake.timeout_next(1, delay=0.8), operation="send_email"),
    Scenario("batch_delivered", _batch, seqs=(1, 2, 3)),
    Scenario("batch_with_a_refused_item", _batch, seqs=(1, 2, 3),
             setup=lambda r: r.fake.fail_batch_items(
                 lambda _i, item: "invalid" if item["attributes"]["seq"] == 2 else None)),
    Scenario("batch_parked_while_open", _batch, seqs=(1, 2, 3), setup=_open_breaker),
]


def dead_by_seq(rig: Rig) -> Counter[int]:
    out: Counter[int] = Counter()
    for d in DeadLetters(settings_for_app(rig.producer)).list(limit=None):
        args = d.args
        seq = (args[2] or {}).get("seq") if d.operation == "track" else (args[0].get("message_data") or {}).get("seq")
        out[int(seq)] += 1
    return out


def run(rig: Rig, sc: Scenario, fault: Fault | None, timeout: float = 60.0) -> tuple[list[str], dict[str, Any]]:
    """Run ``sc`` once with ``fault``; wait until every operation ended and the broker is quiet."""
    rig.reset()
    if sc.setup is not None:
        sc.setup(rig)
    rig.proxy.start_counting(fault)
    sc.enqueue(rig, list(sc.seqs))
    fallback = Fallback(settings_for_app(rig.producer), rig.producer)
    deadline = time.monotonic() + timeout
    stable = 0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not rig.quiet():
            stable = 0
            continue
        if fallback.depth():
            # Parked: the outage is over; release them as the releaser would (batches included).
            Breaker(settings_for_app(rig.producer)).reset()
            fallback.release(100, batch=True)
            stable = 0
            continue
        ended = applied_by_seq(rig.fake, sc.operation) + dead_by_seq(rig)
        if all(ended[s] >= 1 for s in sc.seqs):
            stable += 1
            if stable >= 3:
                break
    commands = rig.proxy.stop_counting()
    applied = applied_by_seq(rig.fake, sc.operation)
    dead = dead_by_seq(rig)
    what = f"{sc.name} fault={fault}"
    missing = [s for s in sc.seqs if applied[s] + dead[s] == 0]
    assert not missing, f"{what}: lost {missing}; commands {commands}\n{rig.worker.tail(40)}"
    assert max(applied.values(), default=0) <= 1, f"{what}: applied twice {applied}"
    if sc.operation != "send_email":
        # Sends in doubt may be both applied and kept for review; nothing else may.
        assert all(applied[s] + dead[s] == 1 for s in sc.seqs), f"{what}: applied {applied} dead {dead}"
    return commands, {"duplicates_ignored": rig.fake.stats["duplicates_ignored"],
                      "dead": sum(dead.values()), "applied": sum(applied.values())}


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_a_fault_at_any_store_command_loses_nothing_and_sends_nothing_twice(rig: Rig, sc: Scenario) -> None:
    if sc.name in {"delivered", "batch_delivered"} and not FULL:
        pytest.skip("its commands are the tail of a longer scenario's (CIO_FULL=1 runs it)")
    started = time.monotonic()
    run(rig, sc, None)  # a warm-up: the store learns the scripts (NOSCRIPT answers are not the path)
    commands, _ = run(rig, sc, None)  # the recording run
    assert commands, "the scenario talks to the store"
    totals: Counter[str] = Counter()
    for k in range(1, len(commands) + 1):
        for mode in MODES:
            fault = Fault(k, mode)
            _, figures = run(rig, sc, fault)
            assert fault.fired, f"{sc.name}: command {k} ({commands[k - 1]}) never came in mode {mode}"
            totals["runs"] += 1
            totals["duplicates_ignored_by_event_id"] += figures["duplicates_ignored"]
            totals["ended_in_dead_letters"] += figures["dead"]
            totals["applied"] += figures["applied"]
    report(f"faults_{sc.name}", commands=len(commands), command_names=commands, modes=list(MODES),
           seconds=round(time.monotonic() - started, 1), **totals)


# One operation each: with two, the drainer may take them in one batch or in two, and the k-th
# command would differ between runs.
COALESCED = [
    Scenario("coalesced_into_a_batch", _track, seqs=(1,)),
    Scenario("coalesced_with_a_refused_item", _track, seqs=(2,),
             setup=lambda r: r.fake.fail_batch_items(
                 lambda _i, item: "invalid" if item["attributes"]["seq"] == 2 else None)),
]


@pytest.mark.parametrize("sc", COALESCED, ids=[s.name for s in COALESCED])
def test_a_fault_at_any_store_command_of_the_batching_path_loses_nothing(coalescing_rig: Rig, sc: Scenario) -> None:
    test_a_fault_at_any_store_command_loses_nothing_and_sends_nothing_twice(coalescing_rig, sc)


def test_the_proxy_counts_pipelined_commands_one_by_one() -> None:
    from tests.resp_proxy import encode, parse_commands

    raw = encode([b"SET", b"a", b"1"]) + encode([b"EVALSHA", b"abc", b"0"]) + b"PING\r\n"
    commands, rest = parse_commands(raw + b"*2\r\n$3\r\nGET")
    assert [c[0] for c in commands] == [[b"SET", b"a", b"1"], [b"EVALSHA", b"abc", b"0"], [b"PING"]]
    assert rest == b"*2\r\n$3\r\nGET"
    assert json.dumps([c[1].decode() for c in commands])
