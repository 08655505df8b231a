"""Adaptive batching past Customer.io's per-request limit, measured as ratios in one run.

    python benchmarks/adaptive_batching.py [--seconds 12] [--concurrency 4]

Everything runs on 127.0.0.1: a broker ``redis-server``, a store ``redis-server``, the fake
Customer.io (30 ms per request, and like Customer.io it answers 429 past 100 requests in any
1 s), and one ``celery worker`` with ``--concurrency`` processes (the recommended
configuration, the package's rate limit at 100/s). Scenarios:

* **saturation**: one process enqueues as fast as it can for ``--seconds``; delivered
  operations per second (applied by the fake, after a 3 s warm-up) for ``track`` and
  ``identify``, through the adaptive path (default settings) and the single path
  (``CIO_BATCH_COALESCE=0``: one request per operation), and a no-op Celery task (one Redis
  write) fed the same way: the ceiling of any design that sends one Celery message per
  operation. Also operations per request and 429s.
* **light load**: 40 ``track`` per second for ``--seconds``; enqueue-to-applied latency, adaptive
  against single.
* **mixed load**: 20 ``send_email`` per second for ``--mixed-seconds`` (30: 600 sends) while
  ``track`` saturates; the sends' latency with adaptive batching, with the single path, and
  alone. The Track API is a second fake in a process of its own, so the process that times the
  sends does not parse the track traffic. Two more pairs: ``mixed_paced`` (``track`` at
  ``--paced-rate``, 500/s, beside the sends) and ``mixed_niced_load`` (saturation with the load
  generator and the Track fake at nice 10, standing for the other machines of a deployment).
* **no rate limit, instant fake**: ``cio_celery.track`` with the single path against a bare
  SDK task (``bench.bare_track``), with the store on its own Redis and on the broker's Redis:
  3,000 queued first, throughput as the fake saw it; ``--unlimited-rounds`` pairs (cio then
  bare) one after the other, the median of the rounds' ratios reported.

Figures go to stdout and to ``benchmarks/results/adaptive_batching.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "adaptive_batching.json"
QUEUES = "cio,cio.send,cio.fallback,bare,noop"


def worker_env(fake: FakeCustomerIO, broker: str, store: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CELERY_BROKER_URL": broker, "CIO_REDIS_URL": store,
           "CIO_SITE_ID": fake.site_id, "CIO_TRACK_API_KEY": fake.track_api_key,
           "CIO_APP_API_KEY": fake.app_api_key, "CIO_TRACK_URL": fake.url, "CIO_APP_URL": fake.url,
           "CIO_TIMEOUT": "5", "CIO_RATE_LIMIT_TRACK": "100", "CIO_RATE_LIMIT_TRANSACTIONAL": "100"}
    env.update(extra)
    return env


def start_worker(env: dict[str, str], concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker", "-P", "prefork",
         "-c", str(concurrency), "-Q", QUEUES, "-n", "bench@%h", "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT,
    )
    time.sleep(4.0)  # started and consuming before the clock runs
    if proc.poll() is not None:
        raise RuntimeError(f"worker exited; see {log}")
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def producer_app(broker: str, store: str, spool: str, **conf: Any) -> Any:
    from celery import Celery

    import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

    app = Celery("bench-producer", broker=broker, set_as_current=False)
    app.conf.update({"cio_redis_url": store, "cio_spool_dir": spool, "broker_connection_retry_on_startup": True,
                     "cio_rate_limit_track": 100, **conf})

    @app.task(name="bench.noop", ignore_result=True)
    def noop(seq: int) -> None:  # the name only: the workers run bench_app's
        return None

    @app.task(name="bench.bare_track", ignore_result=True)
    def bare_track(customer_id: str, name: str, data: dict[str, Any] | None = None) -> None:
        return None

    app.finalize(auto=True)
    return app


def flood(broker: str, store: str, spool: str, what: str, seconds: float, sent: Any, rate: float = 0.0,
          nice: int = 0) -> None:
    """Enqueue as fast as one process can for ``seconds`` (run in a child process); ``rate`` > 0
    paces ``track`` at that many calls a second instead; ``nice`` lowers the process's CPU priority."""
    if nice:
        os.nice(nice)
    app = producer_app(broker, store, spool)
    start = time.monotonic()
    deadline = start + seconds
    i = 0
    if rate > 0:
        task = app.tasks["cio_celery.track"]
        while time.monotonic() < deadline:
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            task.delay(f"user-{i % 5000}", "purchased", {"seq": i, "plan": "pro"})
            i += 1
    elif what == "noop":
        task = app.tasks["bench.noop"]
        while time.monotonic() < deadline:
            task.apply_async((i,), queue="noop")
            i += 1
    elif what == "identify":
        task = app.tasks["cio_celery.identify"]
        while time.monotonic() < deadline:
            task.delay(f"user-{i % 5000}", seq=i, plan="pro")
            i += 1
    else:
        task = app.tasks["cio_celery.track"]
        while time.monotonic() < deadline:
            task.delay(f"user-{i % 5000}", "purchased", {"seq": i, "plan": "pro"})
            i += 1
    sent.value = i


def _redis_cpu(url: str) -> float:
    info = redis.Redis.from_url(url).info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _calls(url: str) -> dict[str, int]:
    stats = redis.Redis.from_url(url).info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if int(v["calls"]) >= 10}


def limited_fake(fake: FakeCustomerIO) -> None:
    """The fake forgets what it saw and answers as Customer.io under load: 30 ms a request, 429
    past 100 requests in any 1 s."""
    fake.clear()
    fake.clear_faults()
    fake.set_latency(0.03)
    fake.set_rate_limit(100, 1.0)


def applied_rate(fake: FakeCustomerIO, t0: float, t1: float) -> float:
    return sum(1 for a in fake.applied if t0 <= a.applied_at < t1) / (t1 - t0)


def saturation(args: Any, fake: FakeCustomerIO, broker_url: str, store_url: str, flush: Any, what: str,
               variant: str, spool: str, log: Path) -> dict[str, Any]:
    flush()
    limited_fake(fake)
    extra = {"CIO_BATCH_COALESCE": "0"} if variant == "single" else {}
    worker = start_worker(worker_env(fake, broker_url, store_url, **extra), args.concurrency, log)
    counter = redis.Redis.from_url(store_url)
    counter.config_resetstat()
    cpu0 = _redis_cpu(store_url), _redis_cpu(broker_url)
    try:
        sent = multiprocessing.Value("l", 0)
        child = multiprocessing.get_context("fork").Process(
            target=flood, args=(broker_url, store_url, spool, "noop" if variant == "noop" else what,
                                args.seconds, sent))
        t_start = time.monotonic()
        child.start()
        time.sleep(3.0)
        t0 = time.monotonic()
        n0 = int(counter.get("bench:noop") or 0)
        requests0 = len(fake.requests)
        admits: list[int] = []
        store_client = redis.Redis.from_url(store_url)
        while time.monotonic() < t0 + max(1.0, args.seconds - 3.0):
            time.sleep(1.0)
            sec = int(store_client.time()[0]) - 1
            admits.append(int(store_client.hget("{cio}:coalesce:arrivals", str(sec)) or 0))
        t1 = time.monotonic()
        n1 = int(counter.get("bench:noop") or 0)
        requests1 = [r for r in fake.requests[requests0:] if r.received_at < t1]
        child.join(60)
    finally:
        stop(worker)
    cpu1 = _redis_cpu(store_url), _redis_cpu(broker_url)
    out: dict[str, Any] = {"enqueued": sent.value, "enqueue_per_second": round(sent.value / args.seconds, 1),
                           "store_redis_cpu_seconds": round(cpu1[0] - cpu0[0], 2),
                           "broker_redis_cpu_seconds": round(cpu1[1] - cpu0[1], 2),
                           "store_command_calls": _calls(store_url)}
    if variant == "noop":
        out["delivered_per_second"] = round((n1 - n0) / (t1 - t0), 1)
        return out
    rate = applied_rate(fake, t0, t1)
    ok = [r for r in requests1 if r.status == 200]
    out.update({
        "delivered_per_second": round(rate, 1),
        "requests_per_second": round(len(requests1) / (t1 - t0), 1),
        "operations_per_request": round(rate * (t1 - t0) / max(1, len(ok)), 1),
        "batch_requests": sum(1 for r in ok if r.operation == "batch"),
        "single_requests": sum(1 for r in ok if r.operation != "batch"),
        "http_429": sum(1 for r in requests1 if r.status == 429),
        "seconds_from_start": round(t1 - t_start, 1),
        "admissions_per_second": admits,
        "queue_backlog_at_end": int(redis.Redis.from_url(broker_url).llen("cio")),
    })
    return out


def latencies(fake: FakeCustomerIO, sent_at: dict[int, float], key: str = "seq") -> list[float]:
    out = []
    for a in fake.applied:
        body = a.json or {}
        seq = (body.get("data") or body.get("attributes") or body.get("message_data") or {}).get(key)
        if isinstance(seq, int) and seq in sent_at:
            out.append(a.applied_at - sent_at[seq])
    return sorted(out)


def pct(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else float("nan")


def light(args: Any, fake: FakeCustomerIO, broker_url: str, store_url: str, flush: Any, variant: str,
          spool: str, log: Path) -> dict[str, Any]:
    flush()
    limited_fake(fake)
    extra = {"CIO_BATCH_COALESCE": "0"} if variant == "single" else {}
    worker = start_worker(worker_env(fake, broker_url, store_url, **extra), args.concurrency, log)
    app = producer_app(broker_url, store_url, spool)
    track = app.tasks["cio_celery.track"]
    sent_at: dict[int, float] = {}
    try:
        n = int(40 * args.seconds)
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i / 40 - time.monotonic()))
            sent_at[i] = time.monotonic()
            track.delay(f"user-{i}", "light", {"seq": i})
        deadline = time.monotonic() + 30
        while len(fake.applied) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop(worker)
    lat = latencies(fake, sent_at)
    return {"operations": len(sent_at), "applied": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "batch_requests": sum(1 for r in fake.requests if r.operation == "batch"), "_latencies": lat}


def _track_fake(site_id: str, track_key: str, app_key: str, urls: Any, done: Any, nice: int = 0) -> None:
    """A fake Track API in a process of its own (run in a child): limited as ``limited_fake``."""
    if nice:
        os.nice(nice)
    with FakeCustomerIO(site_id=site_id, track_api_key=track_key, app_api_key=app_key) as track_fake:
        limited_fake(track_fake)
        urls.put(track_fake.url)
        done.wait(600)
        urls.put({"applied": len(track_fake.applied), "requests": len(track_fake.requests)})


def mixed(args: Any, fake: FakeCustomerIO, broker_url: str, store_url: str, flush: Any, variant: str,
          spool: str, log: Path, rate: float = 0.0, nice: int = 0) -> dict[str, Any]:
    """Sends timed by the in-process fake (the App API); the Track API is a second fake in a
    process of its own, as Customer.io's two APIs are two hosts: the process that times the sends
    does not also parse the track traffic (1,800 batch items/s with batching)."""
    flush()
    limited_fake(fake)
    ctx = multiprocessing.get_context("fork")
    urls, done = ctx.Queue(), ctx.Event()
    track_proc = ctx.Process(target=_track_fake, args=(fake.site_id, fake.track_api_key, fake.app_api_key,
                                                        urls, done, nice))
    track_proc.start()
    sent_at: dict[int, float] = {}
    child = None
    worker = None
    track_seconds = 0.0
    track_stats: dict[str, int] = {"applied": 0, "requests": 0}
    try:
        extra = {"CIO_BATCH_COALESCE": "0"} if variant == "single" else {}
        extra["CIO_TRACK_URL"] = urls.get(timeout=30)
        worker = start_worker(worker_env(fake, broker_url, store_url, **extra), args.concurrency, log)
        app = producer_app(broker_url, store_url, spool)
        send = app.tasks["cio_celery.send_email"]
        if variant != "alone":
            sent = multiprocessing.Value("l", 0)
            child = ctx.Process(target=flood, args=(broker_url, store_url, spool, "track", args.mixed_seconds + 2,
                                                      sent, rate, nice))
            child.start()
            time.sleep(2.0)
        n = int(20 * args.mixed_seconds)
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i / 20 - time.monotonic()))
            sent_at[i] = time.monotonic()
            send.delay({"transactional_message_id": 1, "identifiers": {"id": f"user-{i}"}, "message_data": {"seq": i}})
        deadline = time.monotonic() + 30
        while len([a for a in fake.applied if a.operation == "send_email"]) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        track_seconds = time.monotonic() - start + (2.0 if child is not None else 0.0)
    finally:
        if child is not None:
            child.join(60)
        if worker is not None:
            stop(worker)
        done.set()
        try:
            track_stats = urls.get(timeout=30)
        except queue.Empty:
            pass  # the Track fake never started: the error on its way out says why
        track_proc.join(30)
        if track_proc.is_alive():
            track_proc.kill()
    lat = sorted(a.applied_at - sent_at[(a.json.get("message_data") or {}).get("seq")]
                 for a in fake.applied if a.operation == "send_email"
                 and (a.json.get("message_data") or {}).get("seq") in sent_at)
    return {"sends": len(sent_at), "applied": len(lat), "p50_ms": pct(lat, 0.5), "p99_ms": pct(lat, 0.99),
            "track_applied": track_stats["applied"], "track_requests": track_stats["requests"],
            "track_applied_per_second": round(track_stats["applied"] / max(track_seconds, 1e-9), 1),
            "_latencies": lat}


def pool_round(results: dict[str, Any], name: str, got: dict[str, Any]) -> None:
    """Add one round of a latency scenario: its figures go to ``rounds``; its latencies join the
    scenario's pooled ones, whose p50 and p99 the scenario reports (and the ratios compare)."""
    lat = got.pop("_latencies")
    entry = results.setdefault(name, {"rounds": [], "_latencies": []})
    entry["rounds"].append(got)
    entry["_latencies"] = sorted(entry["_latencies"] + lat)
    entry.update(samples=len(entry["_latencies"]), p50_ms=pct(entry["_latencies"], 0.5),
                 p99_ms=pct(entry["_latencies"], 0.99))
    print(name, f"round {len(entry['rounds'])}", got, flush=True)


def enqueue_unlimited(app: Any, variant: str, n: int) -> None:
    """Queue ``n`` track calls for the no-limit pair: ``bare`` (the bare SDK task) or ours."""
    for i in range(n):
        if variant == "bare":
            app.tasks["bench.bare_track"].apply_async((f"user-{i % 500}", "purchased", {"seq": i}), queue="bare")
        else:
            app.tasks["cio_celery.track"].delay(f"user-{i % 500}", "purchased", {"seq": i})


def unlimited(args: Any, fake: FakeCustomerIO, broker_url: str, store_url: str, flush: Any, variant: str,
              spool: str, log: Path) -> dict[str, Any]:
    flush()
    fake.clear()
    fake.clear_faults()
    n = args.unlimited_n
    enqueue_unlimited(producer_app(broker_url, store_url, spool, cio_rate_limit_track=0), variant, n)
    worker = start_worker(worker_env(fake, broker_url, store_url, CIO_RATE_LIMIT_TRACK="0"), args.concurrency, log)
    cpu0 = _redis_cpu(broker_url), (_redis_cpu(store_url) if store_url.rsplit("/", 1)[0] != broker_url.rsplit("/", 1)[0]
                                    else 0.0)
    try:
        deadline = time.monotonic() + 300
        while len(fake.applied) < n and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        cpu1 = _redis_cpu(broker_url), (_redis_cpu(store_url) if cpu0[1] else 0.0)
        stop(worker)
    times = sorted(r.received_at for r in fake.requests)
    return {"operations": n, "delivered_per_second": round((len(times) - 1) / (times[-1] - times[0]), 1),
            # Redis CPU a delivered operation, from the worker's start (includes its idle start-up).
            "broker_redis_cpu_ms_per_op": round((cpu1[0] - cpu0[0]) * 1000 / n, 3),
            "store_redis_cpu_ms_per_op": round((cpu1[1] - cpu0[1]) * 1000 / n, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--unlimited-n", type=int, default=3000)
    parser.add_argument("--unlimited-rounds", type=int, default=3,
                        help="rounds of the no-limit pair (cio, then bare), the median ratio is reported")
    parser.add_argument("--mixed-seconds", type=float, default=30.0,
                        help="seconds of sends in each mixed load (20 a second: the p99 of 600 is their 6th slowest)")
    parser.add_argument("--paced-rate", type=float, default=500.0,
                        help="track calls a second beside the sends in the paced mixed load")
    parser.add_argument("--latency-rounds", type=int, default=3,
                        help="rounds of each latency scenario (light, mixed), variants alternating; the p99 is "
                             "over all rounds' samples, each round's is kept")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    results: dict[str, Any] = {}
    with RedisServer() as broker, RedisServer() as store_server, tempfile.TemporaryDirectory() as tmp, \
            FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak") as fake:
        broker_url, store_url = f"{broker.url}/0", f"{store_server.url}/0"
        shared_store = f"{broker.url}/1"
        log = Path(tmp) / "worker.log"

        def flush() -> None:
            for url in (broker_url, store_url, shared_store):
                redis.Redis.from_url(url).flushdb()

        def want(name: str) -> bool:
            return not only or name in only

        for what in ("track", "identify"):
            for variant in ("adaptive", "single"):
                name = f"saturation_{what}_{variant}"
                if want(name):
                    results[name] = saturation(args, fake, broker_url, store_url, flush, what, variant, tmp, log)
                    print(name, results[name], flush=True)
        if want("saturation_noop"):
            results["saturation_noop"] = saturation(args, fake, broker_url, store_url, flush, "noop", "noop", tmp,
                                                    log)
            print("saturation_noop", results["saturation_noop"], flush=True)
        # A p99 of one run is its few slowest samples, and this machine's noise moves it by 1.5x:
        # each latency scenario runs --latency-rounds times, its variants alternating, and the
        # p99 is over every round's samples together.
        for _ in range(args.latency_rounds):
            for variant in ("adaptive", "single"):
                if want(f"light_{variant}"):
                    pool_round(results, f"light_{variant}",
                               light(args, fake, broker_url, store_url, flush, variant, tmp, log))
        for _ in range(args.latency_rounds):
            for variant in ("adaptive", "single", "alone"):
                if want(f"mixed_{variant}"):
                    pool_round(results, f"mixed_{variant}",
                               mixed(args, fake, broker_url, store_url, flush, variant, tmp, log))
        # The load generator and the Track API's fake stand for other machines in the niced pair:
        # at nice 10 they leave the two cores to the workers, the Redis servers and the sends
        # when those need them.
        for prefix, how in (("mixed_paced", {"rate": args.paced_rate}), ("mixed_niced_load", {"nice": 10})):
            for _ in range(args.latency_rounds):
                for variant in ("adaptive", "single"):
                    if want(f"{prefix}_{variant}"):
                        pool_round(results, f"{prefix}_{variant}",
                                   mixed(args, fake, broker_url, store_url, flush, variant, tmp, log, **how))
        for name, entry in results.items():
            if entry.pop("_latencies", None) is not None:
                print(name, "pooled:", {k: entry[k] for k in ("samples", "p50_ms", "p99_ms")}, flush=True)
        for store_name, url in (("own_redis", store_url), ("broker_redis", shared_store)):
            # One machine's noise moves a single pair by 0.1: the pair runs several times, one
            # after the other, and each round's ratio counts.
            for r in range(args.unlimited_rounds):
                for variant in ("cio", "bare"):
                    name = f"unlimited_{variant}_store_{store_name}"
                    if want(name):
                        got = unlimited(args, fake, broker_url, url, flush, variant, tmp, log)
                        rounds = results.setdefault(name, {"operations": got["operations"], "rounds": []})["rounds"]
                        rounds.append(got["delivered_per_second"])
                        results[name]["delivered_per_second"] = statistics.median(rounds)
                        print(name, f"round {r + 1}", got, flush=True)
    ratios: dict[str, float] = {}

    def ratio(name: str, a: str, b: str, field: str = "delivered_per_second") -> None:
        if a in results and b in results and results[b].get(field):
            ratios[name] = round(results[a][field] / results[b][field], 3)

    for what in ("track", "identify"):
        ratio(f"{what}_adaptive_over_single", f"saturation_{what}_adaptive", f"saturation_{what}_single")
        ratio(f"{what}_adaptive_over_noop", f"saturation_{what}_adaptive", "saturation_noop")
    ratio("light_p99_adaptive_over_single", "light_adaptive", "light_single", "p99_ms")
    # Each round's own ratio too (rounds of a pair ran one after the other): how much one run says.
    for a, b in (("light_adaptive", "light_single"), ("mixed_adaptive", "mixed_single"),
                 ("mixed_paced_adaptive", "mixed_paced_single"),
                 ("mixed_niced_load_adaptive", "mixed_niced_load_single")):
        if a in results and b in results:
            by_round = [round(x["p99_ms"] / y["p99_ms"], 2) if y["p99_ms"] else None
                        for x, y in zip(results[a]["rounds"], results[b]["rounds"], strict=True)]
            results[f"{a}_over_single_p99_by_round"] = by_round
            print(f"{a}_over_single_p99_by_round", by_round)
    ratio("mixed_send_p99_adaptive_over_alone", "mixed_adaptive", "mixed_alone", "p99_ms")
    ratio("mixed_send_p99_single_over_alone", "mixed_single", "mixed_alone", "p99_ms")
    ratio("mixed_send_p99_adaptive_over_single", "mixed_adaptive", "mixed_single", "p99_ms")
    ratio("mixed_paced_send_p99_adaptive_over_single", "mixed_paced_adaptive", "mixed_paced_single", "p99_ms")
    ratio("mixed_niced_load_send_p99_adaptive_over_single", "mixed_niced_load_adaptive", "mixed_niced_load_single",
          "p99_ms")
    for store_name in ("own_redis", "broker_redis"):
        cio_name, bare_name = f"unlimited_cio_store_{store_name}", f"unlimited_bare_store_{store_name}"
        if cio_name in results and bare_name in results:
            pairs = [round(c / b, 3) for c, b in zip(results[cio_name]["rounds"], results[bare_name]["rounds"],
                                                     strict=True)]
            results[f"unlimited_ratio_rounds_store_{store_name}"] = pairs
            ratios[f"unlimited_cio_over_bare_store_{store_name}"] = statistics.median(pairs)
    summary = {"benchmark": "adaptive_batching", "seconds": args.seconds, "mixed_seconds": args.mixed_seconds,
               "concurrency": args.concurrency,
               "ratios": ratios, "results": results, "python": platform.python_version(),
               "celery": metadata.version("celery"), "cpus": os.cpu_count()}
    print(json.dumps(ratios, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if not only:
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
