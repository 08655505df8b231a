"""The batching latency policy, swept: ``batch_linger`` and ``batch_min_size`` under real load.

    python benchmarks/batching_defaults.py [--seconds 8] [--concurrency 4]

Same rig as ``adaptive_batching.py``: a broker ``redis-server``, a store ``redis-server``, the
fake Customer.io (30 ms a request, 429 past 100 requests in any 1 s) and one ``celery worker``
with the package's rate limit at 100/s. For each setting, one worker runs three loads, each
paced by a child process that enqueues ``track`` and writes its send times to shared memory:

* **150/s**: 1.5x what single requests can carry; every operation is coalesced, and the
  linger or the minimum size decides when a batch leaves;
* **250/s**: 2.5x, near what this 2-core machine delivers at saturation (about 320/s): the
  buffer fills faster than either bound;
* **saturation**: enqueue as fast as one process can; delivered operations per second.

For each load: enqueue-to-applied p50/p99, Track requests per second (what a batch policy
takes from the workspace's shared 100/s) and operations per request. One setting moves at a
time around the defaults (linger 0.1 s, minimum 20). Figures go to stdout and to
``benchmarks/results/batching_defaults.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.adaptive_batching import (  # noqa: E402
    applied_rate,
    flood,
    latencies,
    limited_fake,
    pct,
    producer_app,
    start_worker,
    stop,
    worker_env,
)
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "batching_defaults.json"
DEFAULT_LINGER, DEFAULT_MIN = 0.1, 20
LINGERS = (0.02, 0.05, 0.1, 0.25, 0.5)
MIN_SIZES = (5, 10, 20, 50, 100)


def paced(broker: str, store: str, spool: str, rate: float, n: int, sent_at: Any) -> None:
    """Enqueue ``n`` track operations at ``rate`` per second (in a child process); record when
    each was handed to ``.delay()`` (CLOCK_MONOTONIC is one clock for every process)."""
    app = producer_app(broker, store, spool)
    track = app.tasks["cio_celery.track"]
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        sent_at[i] = time.monotonic()
        track.delay(f"user-{i % 5000}", "purchased", {"seq": i, "plan": "pro"})


def reset(fake: FakeCustomerIO, urls: tuple[str, ...] = ()) -> None:
    for url in urls:
        redis.Redis.from_url(url).flushdb()
    limited_fake(fake)


def load(fake: FakeCustomerIO, broker_url: str, store_url: str, spool: str, rate: float,
         seconds: float) -> dict[str, Any]:
    n = int(rate * seconds)
    sent_at = multiprocessing.Array(ctypes.c_double, n, lock=False)
    child = multiprocessing.get_context("fork").Process(
        target=paced, args=(broker_url, store_url, spool, rate, n, sent_at))
    child.start()
    child.join(seconds * 3 + 30)
    deadline = time.monotonic() + 30
    while len(fake.applied) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    lat = latencies(fake, {i: sent_at[i] for i in range(n) if sent_at[i] > 0})
    ok = [r for r in fake.requests if r.status == 200]
    times = [r.received_at for r in fake.requests]
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return {"rate": rate, "operations": n, "applied": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "requests_per_second": round(len(fake.requests) / max(0.001, span), 1),
            "operations_per_request": round(len(lat) / max(1, len(ok)), 1),
            "batch_requests": sum(1 for r in ok if r.operation == "batch"),
            "single_requests": sum(1 for r in ok if r.operation != "batch"),
            "http_429": sum(1 for r in fake.requests if r.status == 429)}


def saturate(fake: FakeCustomerIO, broker_url: str, store_url: str, spool: str, seconds: float) -> dict[str, Any]:
    sent = multiprocessing.Value("l", 0)
    child = multiprocessing.get_context("fork").Process(
        target=flood, args=(broker_url, store_url, spool, "track", seconds, sent))
    child.start()
    time.sleep(2.0)
    t0 = time.monotonic()
    requests0 = len(fake.requests)
    time.sleep(max(1.0, seconds - 2.0))
    t1 = time.monotonic()
    child.join(60)
    rate = applied_rate(fake, t0, t1)
    ok = [r for r in fake.requests[requests0:] if r.status == 200 and r.received_at < t1]
    return {"delivered_per_second": round(rate, 1),
            "operations_per_request": round(rate * (t1 - t0) / max(1, len(ok)), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rates", default="150,250", help="paced loads, operations per second")
    parser.add_argument("--only-defaults", action="store_true", help="the default point alone (a quick check)")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    points = [(linger, DEFAULT_MIN) for linger in LINGERS] + [(DEFAULT_LINGER, m) for m in MIN_SIZES
                                                                 if m != DEFAULT_MIN]
    if args.only_defaults:
        points = [(DEFAULT_LINGER, DEFAULT_MIN)]
    results: list[dict[str, Any]] = []
    with RedisServer() as broker, RedisServer() as store_server, tempfile.TemporaryDirectory() as tmp, \
            FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak") as fake:
        broker_url, store_url = f"{broker.url}/0", f"{store_server.url}/0"
        log = Path(tmp) / "worker.log"
        for linger, min_size in points:
            reset(fake, (broker_url, store_url))
            env = worker_env(fake, broker_url, store_url, CIO_BATCH_LINGER=str(linger),
                             CIO_BATCH_MIN_SIZE=str(min_size))
            worker = start_worker(env, args.concurrency, log)
            row: dict[str, Any] = {"linger": linger, "min_size": min_size}
            try:
                for rate in rates:
                    reset(fake)  # the stores keep their state: the worker is running
                    row[f"at_{int(rate)}"] = load(fake, broker_url, store_url, tmp, rate, args.seconds)
                reset(fake)
                row["saturation"] = saturate(fake, broker_url, store_url, tmp, args.seconds)
            finally:
                stop(worker)
            results.append(row)
            print(json.dumps(row), flush=True)
    summary = {"benchmark": "batching_defaults", "seconds": args.seconds, "concurrency": args.concurrency,
               "results": results, "python": platform.python_version(), "celery": metadata.version("celery"),
               "cpus": os.cpu_count()}
    if args.only_defaults:
        return
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
