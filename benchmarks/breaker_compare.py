"""cio_celery's Redis breaker against pybreaker's CircuitRedisStorage: same load, same dead upstream.

    python benchmarks/breaker_compare.py [--procs 8] [--seconds 8]

Each of N processes loops: ask the breaker, and when allowed POST to a fake Customer.io
that answers every request with 503 after 50 ms. Reported for each breaker: calls that
reached the dead upstream after the first trip, open periods seen, and the largest number
of calls running at once while the breaker was half-open (the probes).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

import pybreaker
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.breaker import Breaker  # noqa: E402
from cio_celery.settings import build_settings  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

# Lua: increment the in-flight counter and keep its maximum, in one step.
ENTER = """
local n = redis.call('INCR', KEYS[1])
local m = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > m then redis.call('SET', KEYS[2], n) end
return n
"""


def settings(url: str) -> Any:
    return build_settings({
        "redis_url": url, "breaker_consecutive_failures": 5, "breaker_minimum_calls": 10,
        "breaker_failure_rate": 0.5, "breaker_open_base": 1.0, "breaker_open_max": 1.0,
        "breaker_open_jitter": 0.0, "breaker_half_open_probes": 2, "breaker_close_after": 2,
        "breaker_probe_lease": 10.0, "timeout": 2.0,
    }, environ={})


def worker(kind: str, url: str, upstream: str, seconds: float) -> None:
    r = redis.Redis.from_url(url)
    session = requests.Session()

    def hit(probing: bool) -> None:
        if probing:
            r.eval(ENTER, 2, "bench:inflight", "bench:max")
        try:
            session.post(f"{upstream}/api/v1/customers/u/events", json={"name": "x"},
                         auth=("s", "t"), timeout=2).raise_for_status()
        finally:
            if probing:
                r.decr("bench:inflight")

    deadline = time.monotonic() + seconds
    if kind == "cio":
        b = Breaker(settings(url))
        while time.monotonic() < deadline:
            p = b.acquire()
            if not p.allowed:
                time.sleep(0.005)
                continue
            try:
                hit(p.decision == "probe")
                b.record(p, "success")
            except requests.RequestException:
                b.record(p, "failure")
    else:
        storage = pybreaker.CircuitRedisStorage(pybreaker.STATE_CLOSED, r, namespace="bench")
        cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=1, state_storage=storage)
        while time.monotonic() < deadline:
            try:
                cb.call(lambda: hit(storage.state == pybreaker.STATE_HALF_OPEN))
            except pybreaker.CircuitBreakerError:
                time.sleep(0.005)
            except requests.RequestException:
                pass


def run(kind: str, url: str, fake: FakeCustomerIO, procs: int, seconds: float) -> dict[str, Any]:
    r = redis.Redis.from_url(url)
    r.flushdb()
    fake.clear()
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=worker, args=(kind, url, fake.url, seconds)) for _ in range(procs)]
    for w in workers:
        w.start()
    b = Breaker(settings(url))
    first_trip_at = None
    opens = 0
    last_open = False
    while any(w.is_alive() for w in workers):
        if kind == "cio":
            is_open = b.status().state == "open"
        else:
            is_open = (r.get("bench:pybreaker:state") or b"").decode() == pybreaker.STATE_OPEN
        if is_open and not last_open:
            opens += 1
            if first_trip_at is None:
                first_trip_at = len(fake.requests)
        last_open = is_open
        time.sleep(0.002)
    for w in workers:
        w.join()
    total = len(fake.requests)
    after = total - (first_trip_at or total)
    return {
        "breaker": kind,
        "upstream_calls_total": total,
        "upstream_calls_before_first_trip": first_trip_at,
        "upstream_calls_after_first_trip": after,
        "open_periods_seen": opens,
        "calls_per_open_cycle": round(after / max(1, opens), 2),
        "max_concurrent_half_open_calls": int(r.get("bench:max") or 0),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    with RedisServer() as server, FakeCustomerIO(site_id="s", track_api_key="t") as fake:
        fake.set_latency(0.05)
        fake.start_outage(status=503)
        results = [run(kind, f"{server.url}/{i}", fake, args.procs, args.seconds)
                   for i, kind in enumerate(("cio", "pybreaker"))]
    keys = [k for k in results[0] if k != "breaker"]
    print(f"{'':36} {'cio_celery':>12} {'pybreaker':>12}")
    for k in keys:
        print(f"{k:36} {results[0][k]!s:>12} {results[1][k]!s:>12}")
    out = ROOT / "benchmarks" / "results" / "breaker_compare.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"procs": args.procs, "seconds": args.seconds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
