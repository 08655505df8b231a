"""Delivered operations per second, ``cio_celery.track`` against a bare SDK task, and the Redis
commands and round trips each delivery costs.

    python benchmarks/throughput.py [--n 3000] [--rounds 2] [--concurrency 4] [--latency 0.02]

One command starts everything on 127.0.0.1: a broker ``redis-server``, a store
``redis-server`` behind a small TCP proxy that counts round trips, the fake Customer.io, and
real ``celery worker`` processes (prefork, ``--concurrency``, the recommended configuration).

For each round and variant, ``--n`` operations are queued first, then a worker is started
on that variant's queue; throughput is ``n / (last request - first request)`` as the fake saw
them, so worker start-up is not counted. The variants alternate in every round:

* ``bare``: ``bench.bare_track``, a bare Celery task that calls the SDK's ``track`` (retries
  off), acks late: what a team writes without cio_celery;
* ``cio``: ``cio_celery.track`` with everything on (validation, idempotency claim, breaker,
  rate limiter, structured logs); the rate limit is raised to 1,000,000/s so that it is
  asked on every delivery but never sets the pace.

For ``cio``, the store's ``INFO commandstats`` (after ``CONFIG RESETSTAT``) gives the
commands per delivery, and the proxy counts round trips: a round trip is a client write
(one command, or a whole pipeline) followed by the server's answer. Both include the
worker's background work while it runs (configuration check, fallback releaser).

Figures go to stdout and to ``benchmarks/results/throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer, free_port  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"


class RoundTripProxy:
    """A TCP proxy to Redis counting round trips (client write, then server answer)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.round_trips = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self) -> int:
        with self._lock:
            value, self.round_trips = self.round_trips, 0
        return value

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"waiting": False}
            threading.Thread(target=self._pipe, args=(client, upstream, state, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, state, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, state: dict[str, bool], from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client:
                    with self._lock:
                        if not state["waiting"]:
                            self.round_trips += 1
                            state["waiting"] = True
                else:
                    state["waiting"] = False
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self._server.close()


def start_worker(env: dict[str, str], queue: str, concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    fh = open(log, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.bench_app", "worker", "-P", "prefork",
         "-c", str(concurrency), "-Q", queue, "-n", f"bench-{queue}@%h", "--loglevel", "WARNING",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, cwd=str(ROOT), stdout=fh, stderr=subprocess.STDOUT,
    )
    return proc


def enqueue(app: Any, variant: str, n: int) -> None:
    task = app.tasks["bench.bare_track" if variant == "bare" else "cio_celery.track"]
    queue = "bare" if variant == "bare" else "cio"
    for i in range(n):
        task.apply_async((f"user-{i % 500}", "purchased", {"seq": i, "plan": "pro"}), queue=queue)


def run_variant(app: Any, env: dict[str, str], fake: FakeCustomerIO, variant: str, n: int, concurrency: int,
                store: redis.Redis, proxy: RoundTripProxy, log: Path) -> dict[str, Any]:
    fake.clear()
    enqueue(app, variant, n)
    store.config_resetstat()
    proxy.reset()
    worker = start_worker(env, "bare" if variant == "bare" else "cio", concurrency, log)
    try:
        deadline = time.monotonic() + 600
        while len(fake.applied) < n:
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"{variant}: {len(fake.applied)}/{n} applied; see {log}")
            time.sleep(0.05)
        times = sorted(r.received_at for r in fake.requests)
        round_trips = proxy.reset()
        stats = store.info("commandstats")
    finally:
        worker.terminate()
        worker.wait(30)
    out: dict[str, Any] = {"ops_per_second": round((n - 1) / (times[-1] - times[0]), 1),
                           "requests": len(fake.requests)}
    if variant == "cio":
        commands = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
        commands.pop("config", None)
        commands.pop("info", None)
        out["store_commands_per_op"] = round(sum(commands.values()) / n, 2)
        out["store_commands"] = commands
        out["store_round_trips_per_op"] = round(round_trips / n, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency", type=float, default=0.0,
                        help="seconds the fake Customer.io takes per request (0: as fast as it can)")
    args = parser.parse_args()
    from celery import Celery

    with RedisServer() as broker, RedisServer() as store_server, \
            FakeCustomerIO(site_id="bench", track_api_key="bench-key", app_api_key="bench-app") as fake:
        proxy = RoundTripProxy(store_server.port)
        if args.latency:
            fake.set_latency(args.latency)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "CELERY_BROKER_URL": f"{broker.url}/0",
            "CIO_REDIS_URL": f"redis://127.0.0.1:{proxy.port}/0",
            "CIO_SITE_ID": fake.site_id,
            "CIO_TRACK_API_KEY": fake.track_api_key,
            "CIO_APP_API_KEY": fake.app_api_key,
            "CIO_TRACK_URL": fake.url,
            "CIO_APP_URL": fake.url,
            "CIO_RATE_LIMIT_TRACK": "1000000",
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith(("CIO_", "CELERY_"))})
        producer = Celery("bench-producer", broker=env["CELERY_BROKER_URL"], set_as_current=False)
        producer.conf.update(cio_spool_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "cio-bench-spool"))
        import benchmarks.bench_app  # noqa: F401 - registers bench.bare_track
        from benchmarks.bench_app import app as bench_app

        store = redis.Redis(port=store_server.port)
        results: dict[str, list[dict[str, Any]]] = {"bare": [], "cio": []}
        log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
        for r in range(args.rounds):
            for variant in ("bare", "cio"):
                res = run_variant(bench_app, env, fake, variant, args.n, args.concurrency, store, proxy,
                                  log_dir / f"cio-bench-{variant}-{r}.log")
                print(f"round {r + 1} {variant:4}: {res['ops_per_second']:7.1f} ops/s"
                      + (f", {res['store_round_trips_per_op']} round trips and {res['store_commands_per_op']} "
                         f"commands per op" if variant == "cio" else ""), flush=True)
                results[variant].append(res)
        proxy.close()
        del producer
    bare = statistics.median(x["ops_per_second"] for x in results["bare"])
    cio = statistics.median(x["ops_per_second"] for x in results["cio"])
    summary = {
        "benchmark": "throughput",
        "operations_per_round": args.n,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "fake_latency_seconds": args.latency,
        "bare_ops_per_second_median": bare,
        "cio_ops_per_second_median": cio,
        "ratio_cio_over_bare": round(cio / bare, 3),
        "store_round_trips_per_op_median": statistics.median(x["store_round_trips_per_op"] for x in results["cio"]),
        "store_commands_per_op_median": statistics.median(x["store_commands_per_op"] for x in results["cio"]),
        "runs": results,
        "python": platform.python_version(),
        "celery": metadata.version("celery"),
        "cpus": os.cpu_count(),
    }
    print(f"throughput ratio cio/bare: {summary['ratio_cio_over_bare']} (target: at least 0.9)")
    print(f"store round trips per delivered op: {summary['store_round_trips_per_op_median']} (target: at most 3); "
          f"commands per op: {summary['store_commands_per_op_median']}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = "throughput.json" if not args.latency else f"throughput_latency_{int(args.latency * 1000)}ms.json"
    (RESULTS_DIR / name).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
