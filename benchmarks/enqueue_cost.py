"""Cost of ``cio_celery.track.delay()`` against a bare Celery task's ``.delay()``.

    python benchmarks/enqueue_cost.py [--n 5000] [--rounds 5]

Both publish to the same private ``redis-server`` on 127.0.0.1 through the same Celery app.
The bare task takes the same arguments and does nothing else; ``track.delay`` validates
and normalises them, mints the event id and idempotency key, and publishes on the bounded
enqueue pool (see docs/enqueue.md), after recording it in the delivery ledger (one store
round trip; the store is the broker's Redis here). A third variant turns the ledger off
(``cio_ledger=False``) to show its own cost. They alternate in ``--rounds`` rounds of ``--n``
calls each (after a warm-up), the queue is emptied between rounds, and the ratios of the
median per-call times are reported. Figures go to stdout and to
``benchmarks/results/enqueue_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cio_celery.tasks  # noqa: E402, F401 - registers the shared tasks
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "enqueue_cost.json"


def make_app(url: str, spool_dir: str, ledger: bool = True) -> Celery:
    app = Celery("enqueue-bench" if ledger else "enqueue-bench-noledger", broker=url, set_as_current=False)
    app.conf.update(task_default_queue="bare", cio_spool_dir=spool_dir, broker_connection_retry_on_startup=True,
                    cio_ledger=ledger)

    @app.task(name="bench.bare", ignore_result=True)
    def bare(customer_id: str, name: str, data: dict[str, Any] | None = None, **kw: Any) -> None:
        return None

    app.finalize(auto=True)
    return app


def one_round(task: Any, n: int) -> float:
    started = time.perf_counter()
    for i in range(n):
        task.delay(f"user-{i % 1000}", "signed_up", {"plan": "pro", "seats": i % 50, "source": "bench"})
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with RedisServer() as server, tempfile.TemporaryDirectory() as spool_dir:
        url = f"{server.url}/0"
        app = make_app(url, spool_dir)
        app_off = make_app(url, spool_dir, ledger=False)
        client = redis.Redis.from_url(url)
        tasks = {"bare": app.tasks["bench.bare"], "track": app.tasks["cio_celery.track"],
                 "track_without_ledger": app_off.tasks["cio_celery.track"]}
        for task in tasks.values():
            one_round(task, 500)
        times: dict[str, list[float]] = {name: [] for name in tasks}
        for _ in range(args.rounds):
            for name, task in tasks.items():
                client.flushdb()
                times[name].append(one_round(task, args.n))
        client.flushdb()
    bare, track = statistics.median(times["bare"]), statistics.median(times["track"])
    no_ledger = statistics.median(times["track_without_ledger"])
    result = {
        "benchmark": "enqueue_cost",
        "calls_per_round": args.n,
        "rounds": args.rounds,
        "bare_delay_us_median": round(bare * 1e6, 1),
        "track_delay_us_median": round(track * 1e6, 1),
        "ratio_track_over_bare": round(track / bare, 3),
        "track_without_ledger_delay_us_median": round(no_ledger * 1e6, 1),
        "ratio_track_without_ledger_over_bare": round(no_ledger / bare, 3),
        "ratio_ledger_cost_track_over_track_without_ledger": round(track / no_ledger, 3),
        "rounds_us": {k: [round(v * 1e6, 1) for v in vs] for k, vs in times.items()},
        "python": platform.python_version(),
        "celery": metadata.version("celery"),
        "kombu": metadata.version("kombu"),
    }
    print(f"bare task .delay():  {result['bare_delay_us_median']} us per call (median of {args.rounds} rounds)")
    print(f"cio_celery track.delay(): {result['track_delay_us_median']} us per call")
    print(f"cio_celery track.delay() without the ledger: {result['track_without_ledger_delay_us_median']} us")
    print(f"ratio: {result['ratio_track_over_bare']} (target: at most 1.3); without the ledger "
          f"{result['ratio_track_without_ledger_over_bare']}; the ledger's own cost "
          f"{result['ratio_ledger_cost_track_over_track_without_ledger']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
