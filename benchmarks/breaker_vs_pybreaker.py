"""cio_celery's Redis breaker side by side with pybreaker's ``CircuitRedisStorage``.

    python benchmarks/breaker_vs_pybreaker.py [--procs 8] [--seconds 8] [--recovery 4] [--latency 0.05]
                                              [--cio-open-max 2]

The same N worker processes run the same loop against the same dead upstream (a local
FakeCustomerIO answering every request 503 after ``--latency`` seconds), first guarded by
``cio_celery.breaker.Breaker``, then by ``pybreaker.CircuitBreaker`` with Redis storage,
each against a fresh Redis database. The loop: ask the breaker; if allowed, POST to the
fake with ``requests`` and report the outcome; if refused, pause briefly (a real worker
would park the operation and take the next message).

Measured for each breaker:

* calls that reached the dead upstream after the first trip, the number of open windows
  (trips) and so the calls per open window;
* the most calls running at once while the breaker was half-open (the probes), counted
  with a shared Redis counter around each probe's HTTP call;
* the calls that reached the upstream while the shared state said "open";
* after the outage (``--seconds``) the fake recovers and the loop goes on for ``--recovery``
  seconds: how long each breaker takes to let a call succeed and to close again.

Everything runs on 127.0.0.1 and stops by itself; the whole run takes about 30 s.
Figures go to stdout as a table and to ``benchmarks/results/breaker_vs_pybreaker.json``.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import multiprocessing as mp
import platform
import queue
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import pybreaker
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
# The repository's own package, not whatever copy an editable install points at.
sys.path.insert(0, str(ROOT))

import cio_celery  # noqa: E402
from cio_celery.breaker import Breaker, State  # noqa: E402
from cio_celery.settings import Settings, build_settings  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "breaker_vs_pybreaker.json"

SITE_ID, TRACK_KEY = "bench-site", "bench-track-key"
# Pause after a refusal, the same for both breakers: without it 8 processes spin on 2 cores
# and the figures measure CPU starvation instead of the breakers.
REJECT_PAUSE = 0.002
# A worker that has not finished this long after its deadline is stuck: stop the run.
STRAGGLER_GRACE = 20.0

# Instrumentation keys, in the same (fresh) database as the breaker under test.
K_INFLIGHT = "bench:probes:inflight"
K_MAX = "bench:probes:max"
K_TRANSITIONS = "bench:transitions"

# Count a probe in and keep the highest count seen, atomically (INCR then MAX in one script).
_PROBE_ENTER = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""

PYBREAKER_NAMESPACE = "bench"
DECISION_HEADER = "X-Bench-Decision"


def cio_settings(redis_url: str, open_max: float = 2.0) -> Settings:
    """The cio_celery breaker configured as close to the pybreaker one as its rules allow."""
    return build_settings(
        {
            "redis_url": redis_url,
            "breaker_consecutive_failures": 5,  # pybreaker fail_max=5
            "breaker_minimum_calls": 10,
            "breaker_failure_rate": 0.5,
            "breaker_open_base": 1.0,  # pybreaker reset_timeout=1
            "breaker_open_max": open_max,  # cio doubles the open period on repeated trips, capped here
            "breaker_open_jitter": 0.0,
            "breaker_half_open_probes": 2,
            "breaker_close_after": 2,
            "breaker_probe_lease": 10.0,
            "timeout": 2.0,
        },
        environ={},
    )


# -- instrumentation -------------------------------------------------------------------


class CioTransitionLog:
    """A cio_celery listener: the breaker calls it once per transition, in the deciding process."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def state_change(self, cb: Any, old_state: State, new_state: State) -> None:
        self.client.rpush(K_TRANSITIONS, f"{time.monotonic():.6f} {old_state.name} {new_state.name}")


class LoggedRedisStorage(pybreaker.CircuitRedisStorage):
    """pybreaker's Redis storage, writing the state with GETSET instead of SET.

    The value written is the same; GETSET also returns the previous one, so the benchmark
    sees each real change of the shared state exactly once. pybreaker's own listeners are
    no use for this: every process that notices a change announces it again.
    """

    @property
    def state(self) -> str:
        return str(super().state)

    @state.setter
    def state(self, state: str) -> None:
        try:
            # Stamped before the write, the cio listener after its script: a skew far below 1 ms.
            at = time.monotonic()
            old = self._redis.getset(self._namespace("state"), str(state))
            old_name = "none" if old is None else _text(old)
            if old_name != state:
                self._redis.rpush(K_TRANSITIONS, f"{at:.6f} {old_name} {state}")
        except redis.RedisError:
            self.logger.exception("RedisError")  # what pybreaker's setter does


# -- the worker processes --------------------------------------------------------------


@dataclass
class WorkerStats:
    decisions: int = 0
    calls: int = 0
    probes: int = 0
    refused: int = 0
    refuse_seconds: float = 0.0  # time spent deciding a refusal, without the pause after it
    errors: dict[str, int] = field(default_factory=dict)


class Upstream:
    """One worker's HTTP client for the dead upstream, with the probe accounting around it."""

    def __init__(self, base_url: str, client: redis.Redis) -> None:
        self.url = f"{base_url}/api/v1/customers/bench-user/events"
        self.session = requests.Session()
        self.client = client
        self.enter = client.register_script(_PROBE_ENTER)
        # Open the keep-alive connection now, on a control endpoint the fake does not count.
        self.session.get(f"{base_url}/_fake/stats", timeout=5).raise_for_status()

    def post(self, probing: bool) -> None:
        """POST one event; raises for any non-2xx answer (the breakers see that as a failure)."""
        if probing:
            self.enter(keys=[K_INFLIGHT, K_MAX])
        try:
            # The header tells the analysis which state let the call through; the fake records it.
            resp = self.session.post(
                self.url, json={"name": "bench", "data": {}}, auth=(SITE_ID, TRACK_KEY), timeout=2.0,
                headers={DECISION_HEADER: "half-open" if probing else "closed"},
            )
            resp.raise_for_status()
        finally:
            if probing:
                self.client.decr(K_INFLIGHT)


def _loop_cio(redis_url: str, open_max: float, upstream: Upstream, stats: WorkerStats, deadline: float) -> None:
    client = upstream.client
    breaker = Breaker(cio_settings(redis_url, open_max), listeners=[CioTransitionLog(client)])
    while time.monotonic() < deadline:
        stats.decisions += 1
        asked = time.perf_counter()
        permit = breaker.acquire()
        if not permit.allowed:
            stats.refused += 1
            stats.refuse_seconds += time.perf_counter() - asked
            time.sleep(REJECT_PAUSE)
            continue
        probing = permit.decision == "probe"
        stats.calls += 1
        stats.probes += probing
        try:
            upstream.post(probing)
        except requests.RequestException as exc:
            name = type(exc).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1
            breaker.record(permit, "failure", exc=exc)
        else:
            breaker.record(permit, "success")


def _loop_pybreaker(redis_url: str, open_max: float, upstream: Upstream, stats: WorkerStats, deadline: float) -> None:
    del open_max  # the cio loop's knob; pybreaker's reset_timeout stays 1 s
    # CircuitRedisStorage decodes the bytes itself: it needs decode_responses=False.
    client = upstream.client
    storage = LoggedRedisStorage(pybreaker.STATE_CLOSED, client, namespace=PYBREAKER_NAMESPACE)
    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=1, state_storage=storage)

    def call() -> None:
        # pybreaker runs the function from the state object that allowed it (cb._state): a
        # call it lets through outside "closed" is a half-open probe. The storage may already
        # say "open" again by now (another process's probe failed), which is exactly the
        # overlap being measured, so the decision, not a re-read, marks the probe.
        probing = cb._state.name == pybreaker.STATE_HALF_OPEN
        stats.calls += 1
        stats.probes += probing
        upstream.post(probing)

    while time.monotonic() < deadline:
        stats.decisions += 1
        asked = time.perf_counter()
        try:
            cb.call(call)
        except pybreaker.CircuitBreakerError as exc:
            # Raised both when refusing and when this call's failure tripped the breaker.
            if str(exc).startswith("Timeout not elapsed"):
                stats.refused += 1
                stats.refuse_seconds += time.perf_counter() - asked
                time.sleep(REJECT_PAUSE)
            else:
                stats.errors["trip"] = stats.errors.get("trip", 0) + 1
        except requests.RequestException as exc:
            name = type(exc).__name__
            stats.errors[name] = stats.errors.get(name, 0) + 1


def worker_main(
    index: int, upstream_url: str, jobs: mp.Queue[tuple[str, str, float] | None], results: mp.Queue[dict[str, Any]],
    barrier: Barrier, duration: float,
) -> None:
    """One benchmark process: runs each job it is given, in the same process for both breakers."""
    if not cio_celery.__file__ or not cio_celery.__file__.startswith(str(ROOT)):
        raise RuntimeError(f"imported cio_celery from {cio_celery.__file__}, not from {ROOT}")
    # Each transition is logged as a warning; the transition log below already records them.
    logging.getLogger("cio_celery").setLevel(logging.ERROR)
    while (job := jobs.get()) is not None:
        kind, redis_url, open_max = job
        client = redis.Redis.from_url(redis_url, decode_responses=False)
        upstream = Upstream(upstream_url, client)
        stats = WorkerStats()
        barrier.wait(timeout=60)  # every process starts the clock together
        deadline = time.monotonic() + duration
        loop = _loop_cio if kind == "cio_celery" else _loop_pybreaker
        loop(redis_url, open_max, upstream, stats, deadline)
        upstream.session.close()
        client.close()
        results.put({"worker": index, "kind": kind, **asdict(stats)})


# -- analysis --------------------------------------------------------------------------


def analyse(
    kind: str, client: redis.Redis, fake: FakeCustomerIO, started: float, outage_end: float,
    workers: list[dict[str, Any]],
) -> dict[str, Any]:
    """Turn the fake's request log and the transition log into the reported figures."""
    everything = [r for r in fake.requests if r.api != "control"]
    logged: list[tuple[float, str, str]] = []
    for raw in client.lrange(K_TRANSITIONS, 0, -1):
        stamp, old, new = _text(raw).split()
        logged.append((float(stamp), old, new))
    logged.sort()
    recovery = _recovery(everything, logged, outage_end)

    # The outage figures cover the outage only: requests and transitions before it ended.
    calls = sorted(
        (r.received_at, r.headers.get(DECISION_HEADER, "?")) for r in everything if r.received_at < outage_end
    )
    received = [at for at, _ in calls]
    transitions = [t for t in logged if t[0] < outage_end]

    open_at = [t for t, _, new in transitions if new == "open"]
    half_open_at = [t for t, _, new in transitions if new == "half-open"]
    first_trip = open_at[0] if open_at else None
    before = bisect.bisect_left(received, first_trip) if first_trip is not None else len(received)
    after_calls = calls[before:]
    # Closed-state decisions that reached the upstream after the trip: the race between asking
    # the breaker and sending, which no breaker can close.
    in_flight = sum(1 for _, decision in after_calls if decision == "closed")

    # How long each open window lasted: from entering "open" to the next transition.
    open_lengths = [
        logged[i + 1][0] - t for i, (t, _, new) in enumerate(logged[:-1]) if new == "open" and t < outage_end
    ]

    # The state each request found when it arrived: the last transition before it.
    times = [t for t, _, _ in transitions]
    while_open = 0
    for at in received:
        i = bisect.bisect_right(times, at) - 1
        if i >= 0 and transitions[i][2] == "open":
            while_open += 1

    # A cycle runs from one entry into half-open to the next: its calls are the probes that
    # one half-open window let through, plus any that arrived after it reopened.
    bounds = [*half_open_at, float("inf")]
    per_cycle = [
        bisect.bisect_left(received, bounds[i + 1]) - bisect.bisect_left(received, bounds[i])
        for i in range(len(half_open_at))
    ]
    decisions = sum(w["decisions"] for w in workers)
    refused = sum(w["refused"] for w in workers)
    outage_after_trip = outage_end - first_trip if first_trip is not None else 0.0
    return {
        "breaker": kind,
        "upstream_calls_total": len(received),
        "upstream_calls_before_first_trip": before,
        "upstream_calls_after_first_trip": len(after_calls),
        "after_trip_closed_decisions_in_flight": in_flight,
        "after_trip_half_open_probes": len(after_calls) - in_flight,
        "first_trip_after_s": None if first_trip is None else round(first_trip - started, 3),
        "open_windows": len(open_at),
        "mean_open_window_s": round(sum(open_lengths) / len(open_lengths), 3) if open_lengths else None,
        "shortest_open_window_s": round(min(open_lengths), 3) if open_lengths else None,
        "half_open_windows": len(half_open_at),
        "calls_per_open_window": round(len(after_calls) / len(open_at), 2) if open_at else None,
        "upstream_calls_per_s_after_trip": (
            round(len(after_calls) / outage_after_trip, 2) if outage_after_trip > 0 else None
        ),
        "max_calls_in_one_half_open_cycle": max(per_cycle, default=0),
        "max_concurrent_half_open_probes": int(client.get(K_MAX) or 0),
        "probe_calls": sum(w["probes"] for w in workers),
        "calls_arriving_while_open": while_open,
        "breaker_decisions": decisions,
        "refusal_cost_us": round(1e6 * sum(w["refuse_seconds"] for w in workers) / refused, 1) if refused else None,
        "transitions": len(transitions),
        **recovery,
        "worker_errors": _sum_dicts(w["errors"] for w in workers),
        "outage_s": round(outage_end - started, 3),
    }


def _recovery(requests_: list[Any], transitions: list[tuple[float, str, str]], outage_end: float) -> dict[str, Any]:
    """How long after the upstream came back the first call succeeded and the breaker closed."""
    ok = [r.received_at for r in requests_ if r.received_at >= outage_end and r.status == 200]
    closed = [t for t, _, new in transitions if t >= outage_end and new == "closed"]
    return {
        "recovery_first_success_after_s": round(min(ok) - outage_end, 3) if ok else None,
        "recovery_closed_after_s": round(closed[0] - outage_end, 3) if closed else None,
        "recovery_successful_calls": len(ok),
    }


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _sum_dicts(dicts: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": mp.cpu_count(), "cpu_model": cpu, "python": platform.python_version(),
            "pybreaker": metadata.version("pybreaker"), "redis_py": metadata.version("redis"),
            "requests": metadata.version("requests")}


# -- driver ----------------------------------------------------------------------------


def run_variant(
    kind: str, redis_url: str, fake: FakeCustomerIO, procs: Sequence[mp.process.BaseProcess],
    jobs: mp.Queue[tuple[str, str, float] | None], results: mp.Queue[dict[str, Any]], barrier: Barrier,
    seconds: float, recovery: float, open_max: float,
) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url, decode_responses=False)
    client.flushdb()
    fake.clear()
    fake.start_outage(status=503)  # the previous variant ended it
    for _ in procs:
        jobs.put((kind, redis_url, open_max))
    barrier.wait(timeout=60)
    started = time.monotonic()
    time.sleep(seconds)
    fake.end_outage()
    outage_end = time.monotonic()
    rows: list[dict[str, Any]] = []
    deadline = started + seconds + recovery + STRAGGLER_GRACE
    while len(rows) < len(procs):
        try:
            rows.append(results.get(timeout=max(0.1, deadline - time.monotonic())))
        except queue.Empty:
            raise RuntimeError(f"{kind}: only {len(rows)} of {len(procs)} workers finished in time") from None
        if any(p.exitcode not in (None, 0) for p in procs):
            raise RuntimeError(f"{kind}: a worker process died")
    result = analyse(kind, client, fake, started, outage_end, rows)
    client.close()
    return result


ROWS = (
    ("upstream_calls_total", "calls that reached the upstream (outage)"),
    ("upstream_calls_before_first_trip", "  before the first trip"),
    ("upstream_calls_after_first_trip", "  after the first trip"),
    ("after_trip_half_open_probes", "    half-open probes"),
    ("after_trip_closed_decisions_in_flight", "    allowed while closed, sent after trip"),
    ("first_trip_after_s", "first trip after (s)"),
    ("open_windows", "open windows (trips)"),
    ("mean_open_window_s", "mean open window (s)"),
    ("shortest_open_window_s", "shortest open window (s)"),
    ("half_open_windows", "half-open windows"),
    ("calls_per_open_window", "calls per open window (after 1st trip)"),
    ("upstream_calls_per_s_after_trip", "upstream calls per s after 1st trip"),
    ("max_calls_in_one_half_open_cycle", "most calls in one half-open cycle"),
    ("max_concurrent_half_open_probes", "max concurrent half-open probes, whole run"),
    ("probe_calls", "probe calls, whole run"),
    ("calls_arriving_while_open", "calls arriving while state was open"),
    ("recovery_first_success_after_s", "recovery: first success after (s)"),
    ("recovery_closed_after_s", "recovery: closed after (s)"),
    ("breaker_decisions", "breaker decisions (all workers)"),
    ("refusal_cost_us", "time of one refusal under load (us)"),
)


def print_table(results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    print(f"\n{'':44}" + "".join(f"{n:>14}" for n in names))
    for key, label in ROWS:
        print(f"{label:44}" + "".join(f"{results[n][key]!s:>14}" for n in names))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--procs", type=int, default=8, help="worker processes (default 8)")
    ap.add_argument("--seconds", type=float, default=8.0, help="outage length in each variant (default 8)")
    ap.add_argument("--recovery", type=float, default=4.0,
                    help="seconds the loop goes on after the upstream recovers (default 4)")
    ap.add_argument("--cio-open-max", type=float, default=2.0,
                    help="cio_celery breaker_open_max; 1 keeps its open period at 1 s like pybreaker (default 2)")
    ap.add_argument("--latency", type=float, default=0.05, help="upstream answer delay, s (default 0.05)")
    args = ap.parse_args()
    t0 = time.monotonic()
    # spawn: the parent runs the fake's server threads, which a fork would copy mid-flight.
    ctx = mp.get_context("spawn")
    jobs: mp.Queue[tuple[str, str, float] | None] = ctx.Queue()
    results: mp.Queue[dict[str, Any]] = ctx.Queue()
    barrier = ctx.Barrier(args.procs + 1)
    out: dict[str, dict[str, Any]] = {}
    with RedisServer() as server, FakeCustomerIO(site_id=SITE_ID, track_api_key=TRACK_KEY) as fake:
        fake.set_latency(args.latency)
        duration = args.seconds + args.recovery
        procs = [
            ctx.Process(target=worker_main, args=(i, fake.url, jobs, results, barrier, duration), daemon=True)
            for i in range(args.procs)
        ]
        for p in procs:
            p.start()
        try:
            for db, kind in enumerate(("cio_celery", "pybreaker"), start=1):
                print(f"running {kind}: {args.procs} processes, {args.seconds:g} s outage "
                      f"+ {args.recovery:g} s recovered ...", flush=True)
                out[kind] = run_variant(kind, f"{server.url}/{db}", fake, procs, jobs, results, barrier,
                                        args.seconds, args.recovery, args.cio_open_max)
            for _ in procs:
                jobs.put(None)
            for p in procs:
                p.join(10)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
        redis_version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    print_table(out)
    report = {
        "benchmark": "breaker_vs_pybreaker",
        "machine": {**machine(), "redis_server": redis_version},
        "config": {
            "procs": args.procs, "outage_s": args.seconds, "recovery_s": args.recovery,
            "upstream_latency_s": args.latency,
            "upstream": "FakeCustomerIO: every request 503 during the outage, then 200", "reject_pause_s": REJECT_PAUSE,
            "cio_celery": {k: v for k, v in asdict(cio_settings("redis://127.0.0.1", args.cio_open_max)).items()
                           if k.startswith("breaker_")},
            "pybreaker": {"fail_max": 5, "reset_timeout": 1, "storage": "CircuitRedisStorage"},
        },
        "results": out,
        "wall_time_s": round(time.monotonic() - t0, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwall time {report['wall_time_s']} s; written {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
