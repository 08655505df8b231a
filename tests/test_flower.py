"""A real Flower against a real worker and broker: it lists the package's tasks, counts its
custom events in /metrics, and shows no customer data in the task arguments it displays.

Flower facts this relies on (flower 2.2): the /api/* handlers answer 401 unless auth is
configured or FLOWER_UNAUTHENTICATED_API is true (flower/api/__init__.py, prepare); /metrics
is a plain handler without that check (flower/views/monitor.py); every task event, custom
types included, increments flower_events_total{worker, type, task}, the task label taken
from the event or else from the task's earlier events (flower/events.py, observe_task).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cio_celery.breaker import Breaker
from cio_celery.settings import settings_for_app
from cio_celery.testing.redis_server import free_port
from tests.chaos_harness import Cluster, chaos_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EMAIL = "ada-flower@example.com"
SECRET_VALUE = "secret-plan-xyz"
CUSTOMER_ID = "user-flower-7f3a"
SECRETS = (EMAIL, SECRET_VALUE, CUSTOMER_ID, "dup-key-flower")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def poll(what: str, predicate: Callable[[], Any], timeout: float, diagnose: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not seen within {timeout}s\n{diagnose()}")
        time.sleep(0.25)


def events_by_type(metrics: str) -> dict[tuple[str, str], float]:
    """flower_events_total summed over workers: {(type, task): count}."""
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(metrics):
        for s in family.samples:
            if s.name == "flower_events_total":
                k = (s.labels["type"], s.labels["task"])
                out[k] = out.get(k, 0.0) + s.value
    return out


class FlowerProcess:
    def __init__(self, cluster: Cluster, log_path: Path, unauthenticated_api: bool = True) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {**os.environ, **cluster.env, "PYTHONPATH": str(ROOT)}
        env.pop("FLOWER_UNAUTHENTICATED_API", None)
        if unauthenticated_api:
            env["FLOWER_UNAUTHENTICATED_API"] = "true"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "flower", f"--port={self.port}",
             "--address=127.0.0.1", "--persistent=False"],
            env=env, cwd=str(ROOT), stdout=self.log, stderr=subprocess.STDOUT,
        )

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_up(self, timeout: float = 30.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"flower exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                get(f"{self.base}/healthcheck")
            except OSError:
                return False
            return True

        poll("Flower answering", up, timeout, self.tail)

    def events(self) -> dict[tuple[str, str], float]:
        return events_by_type(get(f"{self.base}/metrics"))

    def tasks(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(get(f"{self.base}/api/tasks"))
        return parsed

    def wait_listening(self, cluster: Cluster, diagnose: Callable[[], str]) -> None:
        """Events sent before Flower subscribes are lost (a fanout exchange): send probe
        operations until one shows up in Flower, then forget them in the fake."""
        identify = cluster.task("identify")
        probes: list[str] = []

        def sees_a_probe() -> bool:
            probes.append(identify.delay(f"probe-{len(probes)}").id)
            time.sleep(0.5)
            return bool(set(probes) & set(self.tasks()))

        poll("a probe task in /api/tasks", sees_a_probe, 20, diagnose)
        cluster.fake.wait_for_applied(len(probes), timeout=20)
        cluster.fake.clear()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def test_flower_shows_tasks_and_events_without_customer_data(tmp_path: Path) -> None:
    with chaos_cluster(workers=1, concurrency=2, tmp=tmp_path, CIO_TEST_EVENTS="1",
                       CIO_BREAKER_CONSECUTIVE_FAILURES="3", CIO_BREAKER_MINIMUM_CALLS="1000",
                       CIO_MAX_RETRIES="1", CIO_BATCH_COALESCE="0") as c:
        # One request an operation: an identify that waited past the batching linger would leave
        # in a batch (its 400 split into single sends, no duplicate-suppressed event of its own).
        flower = FlowerProcess(c, tmp_path / "flower.log")
        base = flower.base
        identify, track = c.task("identify"), c.task("track")

        def diagnose() -> str:
            return (f"--- flower\n{flower.tail()}\n--- worker\n{c.workers[0].tail(40)}\n"
                    f"--- fake {c.fake.stats}; dead letters {c.dead_letters().count()}; "
                    f"parked {c.fallback().depth()}")

        events = flower.events
        try:
            flower.wait_up()
            flower.wait_listening(c, diagnose)

            # Delivered, with customer data in the arguments.
            ident = identify.delay(CUSTOMER_ID, email=EMAIL, plan=SECRET_VALUE)
            tracked = track.delay(CUSTOMER_ID, "upgraded", {"plan": SECRET_VALUE})
            c.fake.wait_for_applied(2, timeout=20)
            # Refused (400): dead-lettered.
            c.fake.fail_next(1, status=400)
            rejected = identify.delay("user-rejected", email=EMAIL)
            poll("one dead letter", lambda: c.dead_letters().count() == 1, 20, diagnose)
            # The same caller key twice: delivered once, the second suppressed.
            dups = [identify.apply_async((CUSTOMER_ID,), {"plan": SECRET_VALUE}, idempotency_key="dup-key-flower")
                    for _ in range(2)]
            poll("task-cio-duplicate-suppressed",
                 lambda: events().get(("task-cio-duplicate-suppressed", "cio_celery.identify")), 20, diagnose)
            poll("task-cio-dead-lettered",
                 lambda: events().get(("task-cio-dead-lettered", "cio_celery.identify")) == 1, 10, diagnose)
            assert len([a for a in c.fake.applied if a.operation == "identify"]) == 2

            # A real trip: three failures in a row open the breaker (sent by the task whose
            # failure tripped it); later operations are parked (rerouted).
            c.fake.start_outage(status=503)
            for i in range(8):
                track.delay(f"user-{i}", "during_outage", {"plan": SECRET_VALUE})
            poll("breaker-open and rerouted events",
                 lambda: {"task-cio-breaker-open", "task-cio-rerouted"} <= {t for t, _ in events()}, 30, diagnose)
            c.fake.end_outage()
            # Recovery: the worker's releaser hands parked operations back; probes run in
            # tasks, which announce open -> half-open -> closed.
            poll("breaker half-open and closed events",
                 lambda: {"task-cio-breaker-half-open", "task-cio-breaker-closed"} <= {t for t, _ in events()},
                 30, diagnose)
            poll("the fallback store drained", lambda: c.fallback().depth() == 0, 30, diagnose)

            # Parked by hand, then released as one batch whose first request fails: the batch
            # task is retried, and the retry too must not show the operations.
            def batched() -> int:
                # The three parked by hand (the outage's batches may still be landing).
                return len([a for a in c.fake.applied if a.operation == "batch:event"
                            and (a.json or {}).get("name") == "parked_by_hand"])

            before = batched()
            batch_ok = ("task-succeeded", "cio_celery.deliver_batch")
            batches_before = events().get(batch_ok, 0)
            breaker = Breaker(settings_for_app(c.producer))
            breaker.open()
            for i in range(3):
                track.delay(f"user-batch-{i}", "parked_by_hand", {"plan": SECRET_VALUE})
            poll("three parked", lambda: c.fallback().depth() == 3, 20, diagnose)
            c.fake.fail_next(1, status=503)
            breaker.close()
            poll("the batch retried and delivered",
                 lambda: batched() == before + 3, 30, diagnose)
            poll("the retried batch task's events in Flower",
                 lambda: events().get(batch_ok, 0) > batches_before
                 and events().get(("task-retried", "cio_celery.deliver_batch"), 0) >= 1, 20, diagnose)

            metrics = get(f"{base}/metrics")
            ev = events_by_type(metrics)
            for key in [("task-cio-dead-lettered", "cio_celery.identify"),
                        ("task-cio-duplicate-suppressed", "cio_celery.identify"),
                        ("task-cio-rerouted", "cio_celery.track"),
                        ("task-cio-breaker-open", "cio_celery.track"),
                        ("task-received", "cio_celery.identify"),
                        ("task-succeeded", "cio_celery.track"),
                        ("task-retried", "cio_celery.deliver_batch")]:
                assert ev.get(key, 0) >= 1, (key, sorted(ev))

            tasks_json = get(f"{base}/api/tasks")
            listed = json.loads(tasks_json)
            names = {t.get("name") for t in listed.values()}
            assert {"cio_celery.identify", "cio_celery.track", "cio_celery.deliver_batch"} <= names
            for t in listed.values():
                if t.get("name") in {"cio_celery.identify", "cio_celery.track"}:
                    assert re.fullmatch(r"<\d+ args? hidden>", str(t.get("args"))), t
                    assert re.fullmatch(r"<\d+ kwargs? hidden>", str(t.get("kwargs"))), t
                elif t.get("name") == "cio_celery.deliver_batch":
                    assert str(t.get("args")).endswith(" operations hidden>"), t

            info = json.loads(get(f"{base}/api/task/info/{ident.id}"))
            assert info["name"] == "cio_celery.identify" and info["state"] == "SUCCESS"
            assert info["args"] == "<1 arg hidden>" and info["kwargs"] == "<2 kwargs hidden>"
            assert json.loads(get(f"{base}/api/task/info/{tracked.id}"))["args"] == "<5 args hidden>"
            failed = json.loads(get(f"{base}/api/task/info/{rejected.id}"))
            assert failed["state"] == "FAILURE" and "http_400" in str(failed.get("exception")), failed
            infos = "".join(get(f"{base}/api/task/info/{r.id}") for r in (ident, tracked, rejected, *dups))

            for text, where in [(tasks_json, "/api/tasks"), (infos, "/api/task/info"), (metrics, "/metrics"),
                                (get(f"{base}/tasks"), "/tasks page")]:
                leaked = [s for s in SECRETS if s in text]
                assert not leaked, f"{leaked} in Flower's {where}"
        finally:
            flower.stop()


def test_flower_api_needs_auth_or_the_opt_in(tmp_path: Path) -> None:
    """Without FLOWER_UNAUTHENTICATED_API (and no auth), /api/* is refused; /metrics is not."""
    with chaos_cluster(workers=0) as c:
        flower = FlowerProcess(c, tmp_path / "flower.log", unauthenticated_api=False)
        try:
            flower.wait_up()
            assert status_of(f"{flower.base}/api/tasks") == 401
            assert status_of(f"{flower.base}/metrics") == 200
        finally:
            flower.stop()


def test_worker_started_with_E_sends_the_custom_events(tmp_path: Path) -> None:
    """`celery worker -E` (the documented way) must turn the package's events on too, not only
    `worker_send_task_events` in the configuration."""
    with chaos_cluster(workers=0) as c:
        env = {**os.environ, **c.env, "PYTHONPATH": str(ROOT)}
        env.pop("CIO_TEST_EVENTS", None)  # tests/worker_app.py: worker_send_task_events stays off
        log_path = tmp_path / "worker.log"
        with open(log_path, "wb") as log:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker", "-E", "-P", "prefork", "-c", "1",
                 "-Q", "cio,cio.send,cio.fallback", "-n", "events@%h", "--loglevel", "INFO", "--without-gossip",
                 "--without-mingle", "--without-heartbeat"],
                env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        flower = FlowerProcess(c, tmp_path / "flower.log")

        def diagnose() -> str:
            return f"--- flower\n{flower.tail()}\n--- worker\n{log_path.read_text(errors='replace')[-3000:]}"

        try:
            poll("the worker ready", lambda: b"ready." in log_path.read_bytes(), 30, diagnose)
            flower.wait_up()
            flower.wait_listening(c, diagnose)
            c.fake.fail_next(1, status=400)
            c.task("identify").delay("user-rejected", email=EMAIL)
            poll("task-failed", lambda: flower.events().get(("task-failed", "cio_celery.identify")), 20, diagnose)
            # Sent by the pool process before the task failed, but through another connection.
            poll("task-cio-dead-lettered",
                 lambda: flower.events().get(("task-cio-dead-lettered", "cio_celery.identify")) == 1, 10, diagnose)
        finally:
            flower.stop()
            if worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(10)
