"""How fast a backlog parked during an outage drains: batch mode against one request per operation.

    python benchmarks/batch_drain.py [--ops 20000] [--limit 100] [--concurrency 4] [--latency 0.0]

One command starts a ``redis-server``, the fake Customer.io and, for each mode, a real
``celery worker`` (prefork, ``--concurrency`` processes, the recommended configuration,
the fallback releaser running as in production). Before each worker starts, ``--ops``
``track`` operations are written to the fallback store exactly as workers park them during
an outage; the breaker is closed, so the releaser drains them at once:

* ``single``: ``CIO_BATCH_DRAIN=0``: one request per operation;
* ``batch``: ``CIO_BATCH_DRAIN=1``: ``/api/v2/batch`` requests of up to 1,000 operations.

Both run under the cluster-wide rate limit ``--limit`` requests/s. The drain time is from the
worker's start to the last operation applied by the fake; every operation must be applied
exactly once (counted by its sequence number). Figures go to stdout and
``benchmarks/results/batch_drain.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.settings import build_settings  # noqa: E402
from cio_celery.store import key  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402
from cio_celery.ulid import new_ulid  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "batch_drain.json"


def park_backlog(store: redis.Redis, n: int) -> None:
    """Write ``n`` parked ``track`` operations as a worker's ``Fallback.park`` does."""
    fallback_list = key(build_settings(), "fallback", "ops")
    pipe = store.pipeline(transaction=False)
    for i in range(n):
        task_id = str(uuid.uuid4())
        entry = {"operation": "track", "task_id": task_id,
                 "args": [f"user-{i % 1000}", "purchased", {"seq": i, "plan": "pro"}, new_ulid(), None],
                 "kwargs": {"_cio": {"key": task_id, "enqueued_at": time.time(), "attempts_before": 1}}}
        pipe.rpush(fallback_list, json.dumps(entry, separators=(",", ":")))
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


def applied_counts(fake: FakeCustomerIO) -> Counter[int]:
    out: Counter[int] = Counter()
    for a in fake.applied:
        body = a.json or {}
        data = body.get("attributes") if a.operation.startswith("batch:") else body.get("data")
        if isinstance(data, dict) and "seq" in data:
            out[int(data["seq"])] += 1
    return out


def run_mode(mode: str, n: int, env: dict[str, str], fake: FakeCustomerIO, store: redis.Redis,
             concurrency: int) -> dict[str, Any]:
    store.flushall()
    fake.clear()
    park_backlog(store, n)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"cio-bench-drain-{mode}.log"
    env = {**env, "CIO_BATCH_DRAIN": "1" if mode == "batch" else "0"}
    started = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker", "-P", "prefork",
             "-c", str(concurrency), "-Q", "cio,cio.send,cio.fallback", "-n", f"drain-{mode}@%h",
             "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=env, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT,
        )
        try:
            deadline = started + 1800
            while len(applied_counts(fake)) < n:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{mode}: {len(applied_counts(fake))}/{n} applied; see {log}")
                time.sleep(0.25)
            seconds = time.monotonic() - started
            time.sleep(1.0)
            counts = applied_counts(fake)
        finally:
            proc.terminate()
            proc.wait(60)
    times = sorted(r.received_at for r in fake.requests)
    peak, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - 1.0:
            j += 1
        peak = max(peak, i - j + 1)
    return {
        "seconds": round(seconds, 1),
        "requests": len(fake.requests),
        "applied_once": sum(1 for c in counts.values() if c == 1),
        "applied_more_than_once": sum(1 for c in counts.values() if c > 1),
        "missing": n - len(counts),
        "peak_requests_in_1s": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20_000)
    parser.add_argument("--limit", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    with RedisServer() as server, FakeCustomerIO(site_id="bench", track_api_key="k", app_api_key="a") as fake:
        if args.latency:
            fake.set_latency(args.latency)
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "CELERY_BROKER_URL": f"{server.url}/0",
            "CIO_REDIS_URL": f"{server.url}/1", "CIO_SITE_ID": fake.site_id, "CIO_TRACK_API_KEY": fake.track_api_key,
            "CIO_APP_API_KEY": fake.app_api_key, "CIO_TRACK_URL": fake.url, "CIO_APP_URL": fake.url,
            "CIO_RATE_LIMIT_TRACK": str(args.limit),
            # The releaser is not the bottleneck in either mode.
            "CIO_FALLBACK_RELEASE_RATE": "5000", "CIO_FALLBACK_RELEASE_INTERVAL": "0.2",
        }
        os.environ["CIO_REDIS_URL"] = env["CIO_REDIS_URL"]
        store = redis.Redis.from_url(f"{server.url}/1")
        results = {}
        for mode in ("batch", "single"):
            results[mode] = run_mode(mode, args.ops, env, fake, store, args.concurrency)
            print(f"{mode:6}: {args.ops} operations drained in {results[mode]['seconds']} s with "
                  f"{results[mode]['requests']} requests (peak {results[mode]['peak_requests_in_1s']} in 1 s); "
                  f"applied once {results[mode]['applied_once']}, more than once "
                  f"{results[mode]['applied_more_than_once']}, missing {results[mode]['missing']}", flush=True)
    speedup = results["single"]["seconds"] / results["batch"]["seconds"]
    summary = {"benchmark": "batch_drain", "operations": args.ops, "rate_limit": args.limit,
               "concurrency": args.concurrency, "fake_latency_seconds": args.latency, **results,
               "speedup_batch_over_single": round(speedup, 1), "python": platform.python_version(),
               "cpus": os.cpu_count()}
    print(f"batch drains {summary['speedup_batch_over_single']}x faster (target: at least 15)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
