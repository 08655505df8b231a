"""The README demo: a real worker delivering to a local fake Customer.io, with faults injected.

Starts a private redis-server, the fake Customer.io and a ``celery worker`` subprocess,
enqueues a few operations (one of them meets a 503 and is retried, one a 400 and is
dead-lettered), and prints what the fake received.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    with RedisServer(appendonly=True) as redis_server, FakeCustomerIO(
        site_id="demo-site", track_api_key="demo-track-key", app_api_key="demo-app-key"
    ) as fake:
        env = {
            **os.environ,
            "CELERY_BROKER_URL": f"{redis_server.url}/0",
            "CIO_REDIS_URL": f"{redis_server.url}/1",
            "CIO_SITE_ID": fake.site_id,
            "CIO_TRACK_API_KEY": fake.track_api_key,
            "CIO_APP_API_KEY": fake.app_api_key,
            "CIO_TRACK_URL": fake.url,
            "CIO_APP_URL": fake.url,
            "CIO_RETRY_BACKOFF_BASE": "1",
            "CIO_TIMEOUT": "2",
            # Small numbers so the breaker's life fits in a demo.
            "CIO_BREAKER_CONSECUTIVE_FAILURES": "5",
            "CIO_BREAKER_OPEN_BASE": "3",
            "CIO_BREAKER_OPEN_MAX": "6",
            "CIO_BREAKER_CLOSE_AFTER": "2",
            "CIO_FALLBACK_RELEASE_INTERVAL": "0.5",
            "CIO_MAX_RETRIES": "20",
            "PYTHONPATH": str(ROOT),
        }
        os.environ.update(env)
        say(f"redis-server on {redis_server.url}, fake Customer.io on {fake.url}")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "example_project.celery_app", "worker",
             "-Q", "cio,cio.send,cio.fallback", "-c", "2", "--loglevel", "WARNING", "-n", "demo@%h"],
            env=env, cwd=str(ROOT),
        )
        try:
            from cio_celery import dead_letters, identify, send_email, track
            from example_project.celery_app import app

            time.sleep(3)
            say("Customer.io will answer the next request with 503, and a later one with 400")
            fake.fail_next(1, status=503)
            identify.delay("user-1", email="ada@example.com", plan="pro")
            wait_for(lambda: len(fake.requests) >= 1, 30, "the first request")
            fake.fail_next(1, status=400)
            track.delay("user-1", "signed_up", {"plan": "pro"})
            wait_for(lambda: len(fake.requests) >= 2, 30, "the second request")
            track.delay("user-1", "upgraded", {"plan": "team"})
            send_email.delay({"transactional_message_id": 1, "identifiers": {"id": "user-1"}})
            wait_for(lambda: len(fake.applied) >= 3, 60, "three deliveries")
            store = dead_letters(app)
            wait_for(lambda: store.count() >= 1, 30, "the dead letter")

            say("What the fake Customer.io received")
            start = fake.requests[0].received_at
            for req in fake.requests:
                print(f"  +{req.received_at - start:5.2f}s  {req.method:6} {req.path:38} -> {req.status}"
                      f"  ({req.operation})")
            say("Dead letters")
            for entry in store.list():
                print(f"  {entry.operation:10} reason={entry.reason} status={entry.status} "
                      f"attempts={entry.attempts}")
            say(f"delivered {len(fake.applied)} operations; the 503 was retried after a backoff; "
                f"the 400 was not retried and waits in dead letters for `replay()`")

            from cio_celery.breaker import Breaker
            from cio_celery.fallback import Fallback
            from cio_celery.settings import settings_for_app

            settings = settings_for_app(app)
            breaker, fallback = Breaker(settings), Fallback(settings, app)
            say("Customer.io goes down (every request answers 503) and 100 events are enqueued")
            fake.clear()
            fake.start_outage(status=503)
            for i in range(100):
                track.delay(f"user-{i % 7}", "viewed_item", {"item": i})
            wait_for(lambda: breaker.status().state == "open", 60, "the breaker to open")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 8:
                st = breaker.status()
                print(f"  breaker={st.state:9} time_left={max(st.time_left, 0):4.1f}s trips={st.trips} "
                      f"parked={fallback.depth():3}  requests that reached Customer.io={len(fake.requests)}")
                time.sleep(1)
            say("Customer.io recovers; the fallback releaser drains the parked operations")
            fake.end_outage()
            wait_for(lambda: len(fake.applied) >= 100, 120, "all 100 events")
            st = breaker.status()
            print(f"  breaker={st.state}  parked={fallback.depth()}  delivered={len(fake.applied)} "
                  f"(unique event ids: {len({a.event_id for a in fake.applied})})")
            say("every operation was delivered once; none was called while the breaker was open")

            say("The same sign-up enqueued twice with one idempotency key")
            fake.clear()
            for _ in range(2):
                identify.apply_async(("user-42",), {"plan": "pro"}, idempotency_key="signup-user-42")
            from cio_celery.idempotency import Claims

            claims = Claims(settings)
            wait_for(lambda: claims.suppressed().get("identify", 0) >= 1, 30, "the duplicate to be suppressed")
            print(f"  requests that reached Customer.io: {len(fake.requests)}; "
                  f"suppressed duplicates: {claims.suppressed()}")
        finally:
            worker.terminate()
            worker.wait(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
