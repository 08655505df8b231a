"""Where the single path's time goes against a bare SDK task: cProfile of a solo worker.

    python benchmarks/profile_single_path.py [--ops 3000]

No rate limit, an instant fake Customer.io, the store on its own ``redis-server``. For each of
``cio_celery.track`` and ``bench.bare_track``: the operations are queued first, then one
``celery worker -P solo`` runs under ``cProfile`` until all are applied, and stops warm (the
profile is written at exit). Prints operations per second under the profiler and the
cumulative time per operation of the task body, the store round trips, redis-py's argument
packing, the HTTP send (each client's ``send_request``) and kombu's client creation. The
profiler slows everything; compare the two columns of one run, not runs. Profiles go to ``--out`` (a temporary
folder by default) for ``python -m pstats``.
"""

from __future__ import annotations

import argparse
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.adaptive_batching import enqueue_unlimited, producer_app, worker_env  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

# (label, pstats function-name filter): the functions whose cumulative time is reported.
PARTS = [
    ("task body", r"(cio_celery/tasks.py.*\(track\)|bench_app.py.*\(bare_track\))"),
    ("store round trips (run_script)", r"cio_celery/store.py.*\(run_script\)"),
    ("redis-py argument packing", r"redis/connection.py.*\(pack\)"),
    ("HTTP send (the client's send_request)", r"(cio_celery/client.py|customerio/client_base.py).*\(send_request\)"),
    ("kombu _create_client", r"kombu/transport/redis.py.*\(_create_client\)"),
]


def run(variant: str, ops: int, out: Path) -> tuple[float, Path]:
    with RedisServer() as broker, RedisServer() as store, tempfile.TemporaryDirectory() as spool, \
            FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak") as fake:
        broker_url, store_url = f"{broker.url}/0", f"{store.url}/0"
        enqueue_unlimited(producer_app(broker_url, store_url, spool, cio_rate_limit_track=0), variant, ops)
        profile = out / f"{variant}.prof"
        proc = subprocess.Popen(
            [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "celery", "-A", "benchmarks.bench_app",
             "worker", "-P", "solo", "-Q", "cio,cio.send,cio.fallback,bare", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=worker_env(fake, broker_url, store_url, CIO_RATE_LIMIT_TRACK="0"), cwd=str(ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(fake.applied) < ops and time.monotonic() < deadline:
            time.sleep(0.05)
        times = sorted(r.received_at for r in fake.requests)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return (len(times) - 1) / (times[-1] - times[0]), profile


def cumulative(profile: Path, pattern: str) -> float:
    stats = pstats.Stats(str(profile))
    total = 0.0
    rx = re.compile(pattern)
    for (filename, line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if rx.search(f"{filename}:{line}({name})"):
            total += ct
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="cio-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in ("bare", "cio"):
        rate, profile = run(variant, args.ops, out)
        total = pstats.Stats(str(profile)).total_tt  # type: ignore[attr-defined]
        rows[variant] = {"ops_per_second_profiled": round(rate, 1),
                         "ms_per_op_total": round(total / args.ops * 1000, 2),
                         **{label: round(cumulative(profile, rx) / args.ops * 1000, 2) for label, rx in PARTS}}
    print(f"{'ms per operation (under cProfile)':40} {'bare':>8} {'cio':>8}")
    for field in rows["cio"]:
        print(f"{field:40} {rows['bare'][field]:>8} {rows['cio'][field]:>8}")
    print(f"profiles: {out}")


if __name__ == "__main__":
    main()
