"""A real Flower against the test broker: it lists the package's tasks, counts its custom
events in /metrics, and shows no customer data in the task arguments it displays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.chaos_harness import chaos_cluster

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EMAIL = "ada-flower@example.com"
SECRET_VALUE = "secret-plan-xyz"
EVENTS = ("task-cio-dead-lettered", "task-cio-duplicate-suppressed", "task-cio-rerouted", "task-cio-breaker-open")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def test_flower_shows_tasks_and_events_without_customer_data(tmp_path: Path) -> None:
    from cio_celery.testing.redis_server import free_port

    with chaos_cluster(workers=1, concurrency=2, CIO_TEST_EVENTS="1", CIO_BREAKER_CONSECUTIVE_FAILURES="3",
                       CIO_BREAKER_MINIMUM_CALLS="1000", CIO_MAX_RETRIES="1") as c:
        port = free_port()
        env = {**os.environ, **c.env, "PYTHONPATH": str(ROOT), "FLOWER_UNAUTHENTICATED_API": "true"}
        log = open(tmp_path / "flower.log", "wb")
        flower = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_app", "flower", f"--port={port}",
             "--address=127.0.0.1", "--persistent=False"],
            env=env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    get(f"{base}/metrics")
                    break
                except OSError:
                    if time.monotonic() > deadline or flower.poll() is not None:
                        raise AssertionError((tmp_path / "flower.log").read_text()[-3000:]) from None
                    time.sleep(0.2)
            time.sleep(2.0)  # Flower subscribes to the event stream

            identify, track = c.task("identify"), c.task("track")
            identify.delay("user-flower", email=EMAIL, plan=SECRET_VALUE)
            track.delay("user-flower", "upgraded", {"plan": SECRET_VALUE})
            c.fake.fail_next(1, status=400)
            identify.delay("user-rejected", email=EMAIL)
            for _ in range(2):
                identify.apply_async(("user-dup",), {"plan": SECRET_VALUE}, idempotency_key="dup-1")
            c.fake.wait_for_applied(3, timeout=30)
            c.fake.start_outage(status=503)
            for i in range(8):
                track.delay(f"user-{i}", "during_outage", {"plan": SECRET_VALUE})

            metrics = ""
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline:
                metrics = get(f"{base}/metrics")
                if all(f'type="{e}"' in metrics for e in EVENTS):
                    break
                time.sleep(0.5)
            c.fake.end_outage()
            missing = [e for e in EVENTS if f'type="{e}"' not in metrics]
            assert not missing, f"Flower /metrics lacks {missing}"
            assert 'task="cio_celery.identify"' in metrics and 'task="cio_celery.track"' in metrics

            tasks_json = get(f"{base}/api/tasks")
            tasks = json.loads(tasks_json)
            names = {t.get("name") for t in tasks.values()}
            assert {"cio_celery.identify", "cio_celery.track"} <= names
            shown = [t.get("args") for t in tasks.values() if t.get("name") == "cio_celery.identify"]
            assert shown and all("hidden" in str(a) for a in shown)
            assert EMAIL not in tasks_json and SECRET_VALUE not in tasks_json
            assert "user-flower" not in tasks_json
            assert EMAIL not in metrics and SECRET_VALUE not in metrics
        finally:
            flower.terminate()
            flower.wait(20)
            log.close()
