"""The chaos scenarios with the store on a real 3-master Redis Cluster (the broker a plain Redis).

The scenario bodies are the chaos suite's own (tests/test_chaos.py), run unchanged: only the
cluster they get is built here, with ``CIO_REDIS_URL=redis+cluster://...`` (AOF on each master).
After each, the share of keys, commands and read events of each master is reported
(``$CIO_CHAOS_REPORT``, scenario ``cluster_<name>``).

Adaptive batching is on, as by default: its admission runs in the store's common slot and an
operation that goes alone claims in its shard's slot in a second round trip (docs/cluster.md).
The adaptive batching scenarios of tests/test_coalesce.py run here too.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from cio_celery.testing import FakeCustomerIO
from cio_celery.testing.redis_cluster import RedisClusterServers
from cio_celery.testing.redis_server import RedisServer
from tests import test_chaos, test_coalesce
from tests.chaos_harness import CHAOS_ENV, Cluster, report
from tests.workers import worker_env

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

CLUSTER_ENV: dict[str, str] = {}


def node_figures(urls: list[str]) -> list[dict[str, int]]:
    out = []
    for url in urls:
        client = redis.Redis.from_url(url, socket_timeout=5)
        try:
            stats: Any = client.info("stats")
            cmds: Any = client.info("commandstats")
            out.append({"keys": int(client.dbsize()), "commands": int(stats["total_commands_processed"]),
                        "reads": int(stats["total_reads_processed"]),
                        "evalsha": int(cmds.get("cmdstat_evalsha", {}).get("calls", 0))})
        except (redis.RedisError, OSError):
            out.append({"keys": -1, "commands": 0, "reads": 0, "evalsha": 0})
        finally:
            client.close()
    return out


@contextmanager
def cluster_store_chaos(name: str) -> Iterator[Callable[..., Any]]:
    """A replacement for ``chaos_cluster`` whose store is a Redis Cluster; reports per node."""

    @contextmanager
    def chaos_cluster(workers: int = 2, concurrency: int = 2, separate_store: bool = False,
                      tmp: Path | None = None, **env: str) -> Iterator[Cluster]:
        with ExitStack() as stack:
            broker = stack.enter_context(RedisServer(appendonly=True))
            store = stack.enter_context(RedisClusterServers(appendonly=True))
            fake = stack.enter_context(FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak"))
            broker_url = f"{broker.url}/0"
            full_env = worker_env(fake, broker_url, store.url, **{**CHAOS_ENV, **CLUSTER_ENV, **env})
            producer = Celery("chaos-cluster-producer", broker=broker_url, set_as_current=False)
            conf = {k.lower(): v for k, v in full_env.items() if k.startswith("CIO_") and not k.startswith("CIO_TEST")}
            conf["cio_spool_dir"] = str(tmp / "spool") if tmp is not None else stack.enter_context(
                tempfile.TemporaryDirectory(prefix="cio-chaos-spool-"))
            producer.conf.update(
                conf, broker_transport_options={"visibility_timeout": float(full_env["CIO_TEST_VISIBILITY"])},
                broker_connection_retry_on_startup=True,
            )
            import cio_celery.tasks  # noqa: F401  (registers the shared tasks)

            producer.finalize(auto=True)
            cluster = Cluster(fake, broker, store, broker_url, store.url, full_env, producer)  # type: ignore[arg-type]
            before = node_figures(store.node_urls)
            try:
                for i in range(workers):
                    cluster.start_worker(f"chaos{i}", concurrency)
                yield cluster
                after = node_figures(store.node_urls)
                applied = max(1, len(fake.applied))
                keys = sum(a["keys"] for a in after)
                deltas = [{k: a[k] - b[k] for k in ("commands", "reads", "evalsha")} | {"keys": a["keys"]}
                          for a, b in zip(after, before, strict=True)]
                total = {k: max(1, sum(d[k] for d in deltas)) for k in ("commands", "reads", "evalsha")}
                report(f"cluster_{name}", applied=len(fake.applied), keys=keys,
                       store_reads_per_applied=round(total["reads"] / applied, 2),
                       store_commands_per_applied=round(total["commands"] / applied, 2),
                       nodes=[{"keys": d["keys"], "key_share": round(d["keys"] / max(1, keys), 3),
                               "command_share": round(d["commands"] / total["commands"], 3),
                               "read_share": round(d["reads"] / total["reads"], 3),
                               "evalsha_share": round(d["evalsha"] / total["evalsha"], 3)} for d in deltas])
            finally:
                for w in cluster.workers:
                    if w.proc is not None:
                        w.stop(timeout=20)

    yield chaos_cluster


def run_scenario(monkeypatch: pytest.MonkeyPatch, name: str, scenario: Callable[..., None], *args: Any) -> None:
    with cluster_store_chaos(name) as variant:
        monkeypatch.setattr(test_chaos, "chaos_cluster", variant)
        monkeypatch.setattr(test_coalesce, "chaos_cluster", variant)
        started = time.monotonic()
        scenario(*args)
        print(f"\ncluster store: {name} passed in {time.monotonic() - started:.0f} s")


@pytest.mark.full
def test_faults_5xx_timeouts_and_429_bursts_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "faults",
                 test_chaos.test_5000_operations_under_5xx_timeouts_and_429_bursts_are_each_applied_once)


def test_a_worker_sigkilled_three_times_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "sigkill", test_chaos.test_a_worker_sigkilled_three_times_loses_nothing)


@pytest.mark.full
def test_a_20_second_outage_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "outage_20s",
                 test_chaos.test_a_20_second_outage_trips_the_breaker_parks_and_delivers_everything_once_after)


def test_the_whole_store_cluster_stopped_5s_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scenario stops "the store" and starts it again: here every master (AOF on).
    run_scenario(monkeypatch, "store_down_5s",
                 test_chaos.test_the_store_redis_alone_stopped_5s_under_2000_operations_loses_nothing)


@pytest.mark.full
def test_one_caller_key_twice_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "caller_key_twice",
                 test_chaos.test_the_same_operation_enqueued_twice_with_one_caller_key_is_applied_once)


def test_past_the_limit_operations_leave_in_batches_with_the_store_on_a_cluster(
        monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "coalesce",
                 test_coalesce.test_past_the_limit_operations_leave_in_batches_each_applied_once)


@pytest.mark.full
def test_every_batchable_operation_in_a_burst_with_the_store_on_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    run_scenario(monkeypatch, "coalesce_every_operation",
                 test_coalesce.test_every_batchable_operation_is_converted_and_applied_once_in_a_burst)
