"""Memory of a real Celery worker while it parks operations during a Customer.io outage.

    python benchmarks/parked_memory.py [--ops 200000] [--loglevel INFO]

A private redis-server (broker in db 0, cio_celery store in db 1), a FakeCustomerIO in
outage (every request 503) and one real ``celery worker`` (prefork, concurrency 2, queues
``cio,cio.send,cio.fallback``, app ``tests.worker_app``) whose breaker trips after 3 failures and
then stays open (open_base 300 s) for the whole run. After the trip the benchmark takes
the resident memory (VmRSS) of the worker's main process and of each pool process,
publishes ``--ops`` ``cio_celery.track`` operations, waits until the worker has parked all
of them in the fallback store, and takes the memory again.

The claim checked: parked operations live in Redis, not in the worker, so the worker's
memory does not grow with the outage (target: the largest process grows < 50 MB).

Figures go to stdout and to ``benchmarks/results/parked_memory.json``. The run aborts with a
message after 15 minutes; everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
# The repository's own package (and tests.workers), not whatever an editable install points at.
sys.path.insert(0, str(ROOT))

import cio_celery  # noqa: E402
from cio_celery.breaker import Breaker  # noqa: E402
from cio_celery.fallback import Fallback  # noqa: E402
from cio_celery.settings import settings_for_app  # noqa: E402
from cio_celery.store import key  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402
from tests.workers import worker_env  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "parked_memory.json"
TIME_LIMIT = 15 * 60.0
GROWTH_TARGET_MB = 50.0
TRIP_OPS = 5  # 3 consecutive failures trip the breaker; the rest are parked at once
SAMPLE_EVERY = 5.0  # seconds between memory samples while parking

BREAKER_ENV = {
    "CIO_BREAKER_CONSECUTIVE_FAILURES": "3",
    "CIO_BREAKER_OPEN_BASE": "300",  # open for the whole run: every operation is parked
    "CIO_BREAKER_OPEN_MAX": "600",
    "CIO_BREAKER_OPEN_JITTER": "0",
    # The three tripping operations are retried; short backoff parks them quickly too.
    "CIO_RETRY_BACKOFF_BASE": "0.2",
    "CIO_RETRY_BACKOFF_MAX": "1",
}


class Abort(Exception):
    """The run went over its time limit or the worker died."""


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def check(self, doing: str) -> None:
        if time.monotonic() > self.end:
            raise Abort(f"aborted after {TIME_LIMIT / 60:.0f} minutes while {doing}")


# -- the worker ------------------------------------------------------------------------


class Worker:
    """One ``celery worker`` subprocess, started like tests/workers.py does (same app, same flags)."""

    def __init__(self, env: dict[str, str], loglevel: str) -> None:
        self.env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        self.loglevel = loglevel
        self.log_path = Path("/tmp") / f"cio-bench-worker-{os.getpid()}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, producer: Celery, timeout: float = 60.0) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "tests.worker_app", "worker", "-P", "prefork",
                 "-c", "2", "-Q", "cio,cio.send,cio.fallback", "-n", "bench@%h", "--loglevel", self.loglevel,
                 "--without-gossip", "--without-mingle", "--without-heartbeat"],
                env=self.env, cwd=str(ROOT), stdout=log, stderr=subprocess.STDOUT,
            )
        # A remote-control ping answers only once the consumer is running, at any log level.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if producer.control.ping(timeout=0.5):
                return
        raise Abort(f"worker not ready in {timeout:.0f}s:\n{self.tail()}")

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise Abort(f"the worker exited:\n{self.tail()}")

    def pids(self) -> dict[str, int]:
        """The main process and its pool processes (its direct children)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)],
                             capture_output=True, text=True, check=False)
        children = sorted(int(p) for p in out.stdout.split())
        return {"main": self.proc.pid, **{f"child-{i + 1}": pid for i, pid in enumerate(children)}}

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def memory(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """VmRSS (now) and VmHWM (peak) in MB of each process, from /proc/<pid>/status."""
    out: dict[str, dict[str, float]] = {}
    for name, pid in pids.items():
        fields: dict[str, float] = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    fields[key] = int(value.split()[0]) / 1024.0  # kB -> MB
        except OSError:
            continue  # the process is gone (a pool process replaced): reported as missing
        out[name] = {"pid": pid, "rss_mb": round(fields["VmRSS"], 1), "peak_mb": round(fields["VmHWM"], 1)}
    return out


def total_rss(mem: dict[str, dict[str, float]]) -> float:
    return round(sum(p["rss_mb"] for p in mem.values()), 1)


# -- helpers ---------------------------------------------------------------------------


def wait_for(what: str, cond: Callable[[], bool], deadline: Deadline, worker: Worker, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not cond():
        deadline.check(f"waiting for {what}")
        worker.check_alive()
        if time.monotonic() > end:
            raise Abort(f"timed out after {timeout:.0f}s waiting for {what}\n{worker.tail()}")
        time.sleep(0.1)


def make_producer(broker_url: str, env: dict[str, str]) -> Celery:
    """A producer app configured from the same CIO_* values as the worker (as test_breaker_cluster.py does)."""
    producer = Celery("bench-producer", broker=broker_url, set_as_current=False)
    producer.conf.update({k.lower(): v for k, v in env.items() if k.startswith("CIO_")})
    producer.conf.broker_connection_retry_on_startup = True
    import cio_celery.tasks  # noqa: F401 - registers the shared tasks on every app

    producer.finalize(auto=True)
    return producer


def machine(server_url: str) -> dict[str, Any]:
    cpu, mem_kb = "unknown", 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    info = redis.Redis.from_url(server_url).info("server")
    import celery

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(mem_kb / 1024 / 1024, 1),
            "python": platform.python_version(), "celery": celery.__version__,
            "redis_server": info["redis_version"]}


# -- the run ---------------------------------------------------------------------------


def run(ops: int, loglevel: str) -> dict[str, Any]:
    deadline = Deadline(TIME_LIMIT)
    with RedisServer() as server, FakeCustomerIO(site_id="bench-site", track_api_key="bench-key") as fake:
        broker_url, store_url = f"{server.url}/0", f"{server.url}/1"
        fake.start_outage(status=503)
        env = worker_env(fake, broker_url, store_url, **BREAKER_ENV)
        producer = make_producer(broker_url, env)
        settings = settings_for_app(producer)
        breaker, fallback = Breaker(settings), Fallback(settings, producer)
        broker = redis.Redis.from_url(broker_url)
        store = redis.Redis.from_url(store_url)
        track = producer.tasks["cio_celery.track"]
        worker = Worker(env, loglevel)
        try:
            print("starting the worker ...", flush=True)
            worker.start(producer)

            # 1. Trip the breaker, then let the tripping operations' retries be parked too.
            for i in range(TRIP_OPS):
                track.delay(f"trip-{i}", "bench_trip", {"seq": i})
            wait_for("the breaker to open", lambda: breaker.status().state == "open", deadline, worker, 60)
            wait_for("the tripping operations to be parked", lambda: fallback.depth() >= TRIP_OPS,
                     deadline, worker, 60)
            print(f"breaker open: {breaker.status().as_dict()}", flush=True)
            time.sleep(2.0)  # let the pool settle after its first tasks
            pids = worker.pids()
            before = memory(pids)
            used_before = int(store.info("memory")["used_memory"])
            print(f"RSS before: {total_rss(before)} MB over {len(before)} processes", flush=True)

            # 2. Publish the operations; the worker parks them while we publish.
            t_start = time.monotonic()
            samples: list[dict[str, Any]] = []
            next_sample = t_start
            published_at = 0.0
            with producer.producer_or_acquire() as pub:
                for i in range(ops):
                    track.apply_async((f"user-{i % 10_000}", "bench_event", {"seq": i, "plan": "pro"}),
                                      producer=pub)
                    if (i + 1) % 20_000 == 0 or i + 1 == ops:
                        deadline.check("publishing")
                        worker.check_alive()
                        print(f"  published {i + 1:>7} / {ops}, parked {fallback.depth() - TRIP_OPS:>7}, "
                              f"{time.monotonic() - t_start:6.1f} s", flush=True)
                    if time.monotonic() >= next_sample:
                        samples.append(_sample(t_start, pids, fallback))
                        next_sample += SAMPLE_EVERY
                published_at = time.monotonic() - t_start

            # 3. Wait until every operation is parked (the broker queue drained).
            target = ops + TRIP_OPS
            last_print = time.monotonic()
            while fallback.depth() < target:
                deadline.check(f"parking (depth {fallback.depth()} of {target})")
                worker.check_alive()
                if time.monotonic() >= next_sample:
                    samples.append(_sample(t_start, pids, fallback))
                    next_sample += SAMPLE_EVERY
                if time.monotonic() - last_print > 10:
                    last_print = time.monotonic()
                    print(f"  parked {fallback.depth() - TRIP_OPS:>7} / {ops}, broker queue {broker.llen('cio')}, "
                          f"{time.monotonic() - t_start:6.1f} s", flush=True)
                time.sleep(0.05)
            parked_at = time.monotonic() - t_start
            samples.append(_sample(t_start, pids, fallback))
            time.sleep(2.0)  # a moment for anything the worker still holds to show up
            after = memory(pids)
            final_depth = fallback.depth()
            used_after = int(store.info("memory")["used_memory"])
            entry = store.lindex(key(settings, "fallback", "ops"), -1) or b""
            status = breaker.status()
            requests_seen = fake.stats["received"]
        except BaseException:
            worker.stop()
            print(f"worker log kept: {worker.log_path}", file=sys.stderr)
            raise
        worker.stop()
        # ~100 MB at INFO for 200,000 operations: only worth keeping when something went wrong.
        worker.log_path.unlink(missing_ok=True)
        machine_info = machine(server.url)

    growth = {name: round(after[name]["rss_mb"] - before[name]["rss_mb"], 1) for name in before if name in after}
    largest = max(before, key=lambda n: after.get(n, before[n])["rss_mb"])
    # Growth over the second half of the run only: warm-up of the pool (imports, caches,
    # the first thousands of tasks) is over by then, so growth there scales with the outage.
    half = [s for s in samples if s["depth"] - TRIP_OPS >= ops // 2]
    second_half = (
        round(samples[-1]["rss_total_mb"] - half[0]["rss_total_mb"], 1) if half else None
    )
    return {
        "benchmark": "parked_memory",
        "machine": machine_info,
        "config": {"ops": ops,
                   "worker": "celery worker -P prefork -c 2 -Q cio,cio.send,cio.fallback (tests.worker_app)",
                   "loglevel": loglevel, "prefetch_multiplier": 1, "acks_late": True, **BREAKER_ENV},
        "ops_parked": ops,
        "fallback_depth": final_depth,
        "fallback_depth_expected": target,
        "breaker_state_at_end": status.state,
        "upstream_requests": requests_seen,
        "time_to_publish_s": round(published_at, 1),
        "time_to_park_s": round(parked_at, 1),
        "parking_throughput_ops_per_s": round(ops / parked_at, 1),
        "publish_throughput_ops_per_s": round(ops / published_at, 1),
        "redis_used_memory_mb_before": round(used_before / 2**20, 1),
        "redis_used_memory_mb_after": round(used_after / 2**20, 1),
        "redis_bytes_per_parked_op": round((used_after - used_before) / ops),
        "parked_entry_bytes": len(entry),
        "rss_before": before,
        "rss_after": after,
        "rss_growth_mb": growth,
        "largest_process": largest,
        "largest_process_growth_mb": growth.get(largest),
        "max_growth_any_process_mb": max(growth.values()),
        "rss_total_growth_second_half_mb": second_half,
        "growth_target_mb": GROWTH_TARGET_MB,
        "within_target": max(growth.values()) < GROWTH_TARGET_MB,
        "samples": samples,
    }


def _sample(t_start: float, pids: dict[str, int], fallback: Fallback) -> dict[str, Any]:
    mem = memory(pids)
    return {"t_s": round(time.monotonic() - t_start, 1), "depth": fallback.depth(),
            "rss_total_mb": total_rss(mem), "rss_mb": {n: p["rss_mb"] for n, p in mem.items()}}


def print_report(r: dict[str, Any]) -> None:
    print()
    rows = [
        ("operations parked", r["ops_parked"]),
        ("fallback depth at the end", f"{r['fallback_depth']} (expected {r['fallback_depth_expected']})"),
        ("breaker state at the end", r["breaker_state_at_end"]),
        ("upstream requests (all, incl. trip)", r["upstream_requests"]),
        ("time to publish (s)", r["time_to_publish_s"]),
        ("time to park (s)", r["time_to_park_s"]),
        ("parking throughput (ops/s)", r["parking_throughput_ops_per_s"]),
        ("Redis used_memory before / after (MB)",
         f"{r['redis_used_memory_mb_before']} / {r['redis_used_memory_mb_after']}"),
        ("Redis bytes per parked operation", r["redis_bytes_per_parked_op"]),
        ("one parked entry (JSON bytes)", r["parked_entry_bytes"]),
    ]
    for label, value in rows:
        print(f"{label:40} {value!s:>16}")
    print(f"\n{'process':10} {'pid':>8} {'RSS before':>11} {'RSS after':>10} {'growth':>8} {'peak':>8}  (MB)")
    for name, b in r["rss_before"].items():
        a = r["rss_after"].get(name)
        if a is None:
            print(f"{name:10} {b['pid']:>8} {b['rss_mb']:>11} {'gone':>10}")
            continue
        print(f"{name:10} {b['pid']:>8} {b['rss_mb']:>11} {a['rss_mb']:>10} {r['rss_growth_mb'][name]:>8} "
              f"{a['peak_mb']:>8}")
    verdict = "OK" if r["within_target"] else "OVER TARGET"
    print(f"\nlargest process: {r['largest_process']}, growth {r['largest_process_growth_mb']} MB; "
          f"max growth of any process {r['max_growth_any_process_mb']} MB "
          f"(target < {r['growth_target_mb']:g} MB): {verdict}")
    print(f"total RSS growth over the second half of the run: {r['rss_total_growth_second_half_mb']} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--ops", type=int, default=200_000, help="operations to park (default 200000)")
    ap.add_argument("--loglevel", default="INFO", help="worker log level (default INFO, as in the test suite)")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"where to write the figures (default {RESULTS})")
    args = ap.parse_args()
    if not cio_celery.__file__ or not cio_celery.__file__.startswith(str(ROOT)):
        print(f"imported cio_celery from {cio_celery.__file__}, not from {ROOT}", file=sys.stderr)
        return 2
    try:
        report = run(args.ops, args.loglevel)
    except Abort as exc:
        print(f"\nparked_memory: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {args.json}")
    return 0 if report["within_target"] else 3


if __name__ == "__main__":
    raise SystemExit(main())
