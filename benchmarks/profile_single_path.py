"""Where the single path's time goes against a bare SDK task: cProfile of a solo worker.

    python benchmarks/profile_single_path.py [--ops 3000] [--py-spy]

No rate limit, an instant fake Customer.io, the store on its own ``redis-server``. For each of
``cio_celery.track`` and ``bench.bare_track``: the operations are queued first, then one
``celery worker -P solo`` runs under ``cProfile`` until all are applied, and stops warm (the
profile is written at exit). Prints operations per second under the profiler and the
cumulative time per operation of the task body, the store round trips, redis-py's argument
packing, the HTTP send (each client's ``send_request``) and kombu's client creation. The
profiler slows everything; compare the two columns of one run, not runs. Profiles go to ``--out`` (a temporary
folder by default) for ``python -m pstats``.

``--py-spy`` samples the worker with ``py-spy record`` (500 Hz, idle threads left out, needs
``py-spy`` on the PATH) instead of cProfile: no slow-down, so the figures are the worker's real
milliseconds of CPU per operation (threads py-spy finds idle are left out; redis-py's socket
read, ``SocketBuffer._read_from_socket``, is reported apart).
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


def run(variant: str, ops: int, out: Path, spy: bool = False) -> tuple[float, Path]:
    with RedisServer() as broker, RedisServer() as store, tempfile.TemporaryDirectory() as spool, \
            FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak") as fake:
        broker_url, store_url = f"{broker.url}/0", f"{store.url}/0"
        enqueue_unlimited(producer_app(broker_url, store_url, spool, cio_rate_limit_track=0), variant, ops)
        profile = out / (f"{variant}.txt" if spy else f"{variant}.prof")
        runner = (["py-spy", "record", "-r", "500", "-f", "raw", "-o", str(profile), "--", sys.executable] if spy
                  else [sys.executable, "-m", "cProfile", "-o", str(profile)])
        proc = subprocess.Popen(
            [*runner, "-m", "celery", "-A", "benchmarks.bench_app",
             "worker", "-P", "solo", "-Q", "cio,cio.send,cio.fallback,bare", "--loglevel", "WARNING",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            env=worker_env(fake, broker_url, store_url, CIO_RATE_LIMIT_TRACK="0"), cwd=str(ROOT),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while len(fake.applied) < ops and time.monotonic() < deadline:
            time.sleep(0.05)
        times = sorted(r.received_at for r in fake.requests)
        proc.send_signal(signal.SIGINT if spy else signal.SIGTERM)
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


# (label, regular expression on a py-spy frame "function (file:line)"): inclusive samples.
SPY_PARTS = [
    ("task body", r"^(track \(cio_celery/tasks|bare_track \((benchmarks/)?bench_app)"),
    ("store round trips (run_script)", r"^run_script \(cio_celery/store"),
    ("  of which in the socket read (_read_from_socket)", r"^SocketBuffer._read_from_socket"),
    ("redis-py argument packing", r"^PythonRespSerializer.pack"),
    ("HTTP send (the client's send_request)", r"send_request \((cio_celery/client|customerio/client_base)"),
    ("kombu _create_client", r"_create_client \(kombu"),
]


def spy_rows(profile: Path, ops: int) -> dict[str, float]:
    """Milliseconds of CPU an operation from py-spy's raw stacks (500 samples a second)."""
    stacks = []
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        stacks.append((stack.split(";"), int(n)))
    ms = 1000 / 500 / ops
    rows = {"ms_per_op_total": round(sum(n for _, n in stacks) * ms, 3)}
    for label, pattern in SPY_PARTS:
        rx = re.compile(pattern)
        if label.startswith("  of which"):
            inner = re.compile(SPY_PARTS[1][1])
            count = sum(n for st, n in stacks if any(inner.search(f) for f in st) and rx.search(st[-1]))
        else:
            count = sum(n for st, n in stacks if any(rx.search(f) for f in st))
        rows[label] = round(count * ms, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--out", default="")
    parser.add_argument("--py-spy", action="store_true", help="sample with py-spy instead of cProfile")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="cio-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for variant in ("bare", "cio"):
        rate, profile = run(variant, args.ops, out, args.py_spy)
        if args.py_spy:
            rows[variant] = {"ops_per_second": round(rate, 1), **spy_rows(profile, args.ops)}
            continue
        total = pstats.Stats(str(profile)).total_tt  # type: ignore[attr-defined]
        rows[variant] = {"ops_per_second_profiled": round(rate, 1),
                         "ms_per_op_total": round(total / args.ops * 1000, 2),
                         **{label: round(cumulative(profile, rx) / args.ops * 1000, 2) for label, rx in PARTS}}
    how = "sampled by py-spy" if args.py_spy else "under cProfile"
    print(f"{'ms per operation (' + how + ')':40} {'bare':>8} {'cio':>8}")
    for field in rows["cio"]:
        print(f"{field:40} {rows['bare'][field]:>8} {rows['cio'][field]:>8}")
    print(f"profiles: {out}")


if __name__ == "__main__":
    main()
