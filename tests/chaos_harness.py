"""The chaos suite's cluster: private redis-servers (AOF on), real prefork workers, the fake.

The broker is a redis-server (the default) or, with ``broker="rabbitmq"``, the test's own
RabbitMQ node (tests/rabbitmq.py) beside a separate Redis store; producer and workers then use
``recommended_celery_config(transport="amqp")`` (publisher confirms, persistent messages).

Every operation carries a unique sequence number (``seq``) so the fake can count how many
times each one was applied; "exactly once" means applied once. Figures of each scenario go
to stdout and, one JSON line per scenario, to ``$CIO_CHAOS_REPORT``
(default ``/tmp/cio-chaos-report.jsonl``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from celery import Celery

from cio_celery.checks import recommended_celery_config
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_server import RedisServer
from tests.workers import WorkerProcess, worker_env

# Fast clocks so a scenario fits in tens of seconds; the logic is the production logic.
CHAOS_ENV = {
    "CIO_TEST_VISIBILITY": "10",
    "CIO_TEST_RESTORE_INTERVAL": "1",
    "CIO_TEST_RESTORE_THROTTLE": "1",
    "CIO_TIMEOUT": "0.5",
    "CIO_TASK_TIME_LIMIT": "5",
    "CIO_MAX_RETRIES": "40",
    "CIO_RETRY_BACKOFF_BASE": "0.05",
    "CIO_RETRY_BACKOFF_MAX": "1",
    "CIO_RETRY_AFTER_MAX": "2",
    "CIO_BREAKER_OPEN_BASE": "1",
    "CIO_BREAKER_OPEN_MAX": "3",
    "CIO_FALLBACK_RELEASE_RATE": "1000",
    "CIO_FALLBACK_RELEASE_INTERVAL": "0.2",
    # The limiter stays on (a 429 pauses it for every worker) but does not set the pace.
    "CIO_RATE_LIMIT_TRACK": "1000",
}


class Broker(Protocol):
    """What a scenario does to its broker: a RedisServer or a tests.rabbitmq.RabbitMQNode."""

    def start(self) -> Any: ...

    def stop(self, kill: bool = False) -> None: ...


@dataclass
class Cluster:
    fake: FakeCustomerIO
    broker: Broker
    store: RedisServer
    broker_url: str
    store_url: str
    env: dict[str, str]
    producer: Celery
    workers: list[WorkerProcess] = field(default_factory=list)
    task_ids: dict[int, str] = field(default_factory=dict)  # seq -> task id, to trace a lost one
    kind: str = "redis"  # the broker: "redis" or "rabbitmq"

    def task(self, operation: str) -> Any:
        return self.producer.tasks[f"cio_celery.{operation}"]

    def enqueue_track(self, n: int, start: int = 0) -> None:
        track = self.task("track")
        for i in range(start, start + n):
            self.task_ids[i] = track.delay(f"user-{i % 97}", "chaos", {"seq": i}).id

    def trace(self, seq: int) -> str:
        """Every worker log line naming the task id of ``seq``."""
        tid = self.task_ids.get(seq)
        if tid is None:
            return f"seq {seq}: no task id recorded"
        lines = []
        for w in self.workers:
            try:
                text = w.log_path.read_text(errors="replace")
            except OSError:
                continue
            lines += [f"{w.name}: {line}" for line in text.splitlines() if tid in line]
        return f"seq {seq} task {tid}:\n" + "\n".join(lines[-20:])

    def applied(self, operation: str = "track") -> Counter[int]:
        """How many times each sequence number was applied by the fake."""
        # Operations drained after an outage arrive as items of /api/v2/batch requests.
        batch_action = {"track": "batch:event", "identify": "batch:identify"}.get(operation)
        out: Counter[int] = Counter()
        for a in self.fake.applied:
            body = a.json or {}
            if a.operation == operation:
                seq = body.get("data", {}).get("seq") if operation in {"track", "track_anonymous"} \
                    else body.get("seq")
            elif a.operation == batch_action:
                seq = (body.get("attributes") or {}).get("seq")
            else:
                continue
            if seq is not None:
                out[int(seq)] += 1
        return out

    def dead_letters(self) -> DeadLetters:
        return DeadLetters(settings_for_app(self.producer), self.producer)

    def fallback(self) -> Fallback:
        return Fallback(settings_for_app(self.producer), self.producer)

    def start_worker(self, name: str, concurrency: int = 2) -> WorkerProcess:
        w = WorkerProcess(self.env, concurrency=concurrency, name=name).start(self.broker_url)
        self.workers.append(w)
        return w

    def alive(self) -> bool:
        return all(w.proc is not None and w.proc.poll() is None for w in self.workers if w.proc is not None)

    def exits(self) -> str:
        """Which worker exited, with its exit status (negative: the signal), and its log's last lines."""
        out = []
        for w in self.workers:
            code = w.proc.poll() if w.proc is not None else None
            if code is not None:
                out.append(f"{w.name} exited with {code}:\n{w.tail(15)}")
        return "\n".join(out) or "all alive"


@contextmanager
def chaos_cluster(
    workers: int = 2, concurrency: int = 2, separate_store: bool = False, tmp: Path | None = None,
    broker: str = "redis", rabbitmq: Any = None, **env: str
) -> Iterator[Cluster]:
    """Broker, store, fake and ``workers`` prefork workers of ``concurrency`` processes.

    ``broker="rabbitmq"``: a RabbitMQ node as broker (``rabbitmq``, a running
    tests.rabbitmq.RabbitMQNode the caller owns, else one started here) and always a separate
    Redis store; the ``cio``, ``cio.send`` and ``cio.fallback`` queues are deleted first.
    """
    with ExitStack() as stack:
        node: Broker
        if broker == "rabbitmq":
            from tests.rabbitmq import RabbitMQNode

            if rabbitmq is None:
                rabbitmq = stack.enter_context(RabbitMQNode())
            elif rabbitmq.process is None:
                rabbitmq.start()  # a scenario before this one left it stopped
            rabbitmq.delete_queues("cio", "cio.send", "cio.fallback")
            node = rabbitmq
            store = stack.enter_context(RedisServer(appendonly=True))
            broker_url = rabbitmq.url
        else:
            redis_broker = stack.enter_context(RedisServer(appendonly=True))
            store = stack.enter_context(RedisServer(appendonly=True)) if separate_store else redis_broker
            node = redis_broker
            broker_url = f"{redis_broker.url}/0"
        fake = stack.enter_context(FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak"))
        store_url = f"{store.url}/1"
        full_env = worker_env(fake, broker_url, store_url, **{**CHAOS_ENV, **env})
        producer = Celery("chaos-producer", broker=broker_url, set_as_current=False)
        conf = {k.lower(): v for k, v in full_env.items() if k.startswith("CIO_") and not k.startswith("CIO_TEST")}
        # The producer's enqueue spool, never the user's default state directory.
        spool_dir = str(tmp / "spool") if tmp is not None else stack.enter_context(
            tempfile.TemporaryDirectory(prefix="cio-chaos-spool-"))
        conf["cio_spool_dir"] = spool_dir
        if broker == "rabbitmq":
            # The app's side of the recommendation: publisher confirms, persistent messages, and
            # countdowns bounded by the test's short "visibility timeout" (at most 1 s).
            producer.conf.update(recommended_celery_config(
                visibility_timeout=float(full_env["CIO_TEST_VISIBILITY"]), transport=broker_url), **conf)
        else:
            producer.conf.update(
                conf,
                broker_transport_options={"visibility_timeout": float(full_env["CIO_TEST_VISIBILITY"])},
                broker_connection_retry_on_startup=True,
            )
        import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

        producer.finalize(auto=True)
        cluster = Cluster(fake, node, store, broker_url, store_url, full_env, producer,
                          kind="rabbitmq" if broker == "rabbitmq" else "redis")
        try:
            for i in range(workers):
                cluster.start_worker(f"chaos{i}", concurrency)
            yield cluster
        finally:
            for w in cluster.workers:
                if w.proc is not None:
                    w.stop(timeout=20)


def wait_all_applied(cluster: Cluster, n: int, timeout: float, operation: str = "track") -> float:
    """Wait until every seq in range(n) was applied at least once; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if len(cluster.applied(operation)) >= n:
            return time.monotonic() - started
        time.sleep(0.2)
    got = cluster.applied(operation)
    missing = sorted(set(range(n)) - set(got))[:20]
    tails = "\n".join(f"--- {w.name}\n{w.tail(30)}" for w in cluster.workers)
    traces = "\n".join(cluster.trace(seq) for seq in missing[:5])
    raise AssertionError(f"{len(got)}/{n} applied after {timeout}s; first missing {missing}; "
                         f"fake stats {cluster.fake.stats}; dead letters {cluster.dead_letters().count()}\n"
                         f"traces:\n{traces}\n{tails}")


def report(scenario: str, **figures: Any) -> None:
    line = {"scenario": scenario, **figures}
    print(f"\nchaos {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
    path = os.environ.get("CIO_CHAOS_REPORT", "/tmp/cio-chaos-report.jsonl")
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line) + "\n")
