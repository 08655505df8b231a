"""Memory of the idempotency done marks: measured on real deliveries, projected to a week.

    python benchmarks/idempotency_memory.py [--ops 10000] [--caller-ops 2000] [--no-cluster]
    python benchmarks/idempotency_memory.py --encodings     # only the encodings compared (10 s)

1. Real deliveries. A private broker redis-server, a private store redis-server, the fake
   Customer.io and two real ``celery worker`` processes (prefork -c 2, ``tests.worker_app``)
   with the default settings, except the rate limit (off, so the run is not paced at 95/s).
   After a warm-up, ``--ops`` ``track`` operations without a caller key, then ``--caller-ops``
   ``identify`` operations each with a caller key, are delivered. The store's keyspace memory
   (MEMORY STATS: dataset plus the key tables; client buffers left out) is read before and
   after each phase, and every key left is inspected: type, encoding, expiry.
2. Encodings. The same 200,000 marks as one string key each (the previous layout), as 8-byte
   hash fields (listpack under ``hash-max-listpack-entries``, hashtable over it) and as 64-bit
   set members (intset under ``set-max-intset-entries``, hashtable over it).
   Density. A mark's cost depends on how many marks share a set: marks per shard and bucket =
   rate x bucket width / 1,024. For each rate of the table, random marks are written at that
   density into a sample of shards by the done script's own Lua (``mark_done``), and the
   keyspace growth per mark is read. The previous layout (one ``SET key d:<task id> PX``
   string per mark) is measured the same way, in the same run.
3. Projection. Marks alive at r operations/s = r x (retention + bucket / 2): each mark lives its
   retention plus what is left of its bucket (the sets' real expiries of phase 1 are shown).
   A week at r: task-id marks are at their steady state after their horizon (4.4 h by
   default); caller-key marks (7 days) are all still alive.
4. Lookup cost. Redis CPU per claim (INFO commandstats) on a store holding a whole horizon of
   marks at 2,000 ops/s (in a sample of shards), against the previous layout's claim script.
5. Cluster (unless ``--no-cluster``). Phase 1's ``track`` run again with the store on a
   3-master Redis Cluster: keys, memory and commands per node (DBSIZE, INFO commandstats), and
   the store's read events (INFO stats ``total_reads_processed``: one per request a client
   sent, a pipeline being one) per delivered operation, against the single store of phase 1.

Figures go to stdout and ``benchmarks/results/idempotency_memory.json``. Everything stays on
127.0.0.1; the run stops by itself (about 5 minutes here).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cio_celery.idempotency import LOOKUP_LUA, Claims, bucket_ms  # noqa: E402
from cio_celery.ledger import Ledger  # noqa: E402
from cio_celery.settings import build_settings, settings_for_app  # noqa: E402
from cio_celery.store import SHARDS  # noqa: E402
from cio_celery.testing import FakeCustomerIO  # noqa: E402
from cio_celery.testing.redis_cluster import RedisClusterServers  # noqa: E402
from cio_celery.testing.redis_server import RedisServer  # noqa: E402
from tests.workers import WorkerProcess, worker_env  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "idempotency_memory.json"
ENCODINGS = ROOT / "benchmarks" / "results" / "idempotency_encodings.json"
RATES = (100, 1_000, 2_000, 10_000)
WEEK = 7 * 86400
GB = 1e9
# Marks written per density measurement (spread over as many sample shards as that allows).
FILL_MARKS = 1_500_000

# The worker's settings are the defaults but for the rate limit (and CIO_TIMEOUT, which
# worker_env sets to 2 s: put back to its default, the claim lease and horizon follow it).
ENV = {"CIO_TIMEOUT": "10", "CIO_RATE_LIMIT_TRACK": "0", "CIO_RATE_LIMIT_TRANSACTIONAL": "0"}

# The done script's own Lua, writing many marks per call: KEYS: one index. ARGV: now ms, series id,
# bucket ms, retention ms, set limit, prefix, then (member, path, shard) per mark.
FILL = LOOKUP_LUA + """
local now, id, w, r, limit, prefix = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5]), ARGV[6]
for i = 7, #ARGV, 3 do
  mark_done(prefix .. 'index:' .. ARGV[i + 2], prefix, ARGV[i + 2], ARGV[i], tonumber(ARGV[i + 1]), now, id, w, r,
            limit)
end
return 1
"""

# The previous layout's claim and done scripts (a done mark was the claim key itself), for phase 4.
OLD_CLAIM = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then
  redis.call('DEL', KEYS[1])
end
if redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'NX', 'PX', ARGV[2]) then
  local lost = redis.call('INCR', KEYS[2]) - 1
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'claimed', lost}
end
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 2) == 'd:' then
  redis.call('HINCRBY', KEYS[3], 'suppressed:' .. ARGV[4], 1)
  return {'done', 0}
end
return {'held', redis.call('PTTL', KEYS[1])}
"""
OLD_DONE = """
local v = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'd:' .. ARGV[3], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if v == 'c:' .. ARGV[1] then return 1 end
return 0
"""


# -- measuring a store ---------------------------------------------------------------------------


def keyspace(client: redis.Redis) -> int:
    """Bytes held by keys: MEMORY STATS' dataset plus the key tables (not client buffers)."""
    stats: Any = client.memory_stats()
    tables = sum(sum(int(x) for x in v.values()) for k, v in stats.items() if k.startswith("db."))
    return int(stats["dataset.bytes"]) + tables


def node_figures(client: redis.Redis) -> dict[str, Any]:
    stats: Any = client.info("stats")
    cmds: Any = client.info("commandstats")
    return {"keyspace_bytes": keyspace(client), "keys": int(client.dbsize()),
            "used_memory": int(client.info("memory")["used_memory"]),
            "reads": int(stats["total_reads_processed"]), "commands": int(stats["total_commands_processed"]),
            "evalsha": int(cmds.get("cmdstat_evalsha", {}).get("calls", 0))}


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if k != "keys"} | {"keys": after["keys"]}


def inspect(client: redis.Redis) -> dict[str, Any]:
    """Every key left in a store: counts by kind, set encodings and sizes, set expiries."""
    kinds: Counter[str] = Counter()
    encodings: Counter[str] = Counter()
    marks, sets, expiries = 0, 0, []
    now_ms = time.time() * 1000
    for raw in client.scan_iter(count=1000):
        name = raw.decode()
        kind = client.type(raw).decode()
        label = ("done-mark set" if kind == "set" else "index" if ":idem:index:" in name
                 else "claim or attempt" if ":idem:" in name else name.split("}:", 1)[-1].split(":")[0])
        kinds[label] += 1
        if kind == "set":
            sets += 1
            marks += int(client.scard(raw))
            encodings[str(client.object("encoding", raw), "ascii")] += 1
            expiries.append((client.pexpiretime(raw) - now_ms) / 1000)
    return {"keys_by_kind": dict(kinds), "sets": sets, "marks": marks, "set_encodings": dict(encodings),
            "set_expires_in_s": [round(min(expiries)), round(max(expiries))] if expiries else None}


# -- phase 1 (and 5): real deliveries ----------------------------------------------------------


@contextmanager
def rig(store_url: str, store_clients: list[redis.Redis]) -> Iterator[tuple[Celery, FakeCustomerIO, Any]]:
    with ExitStack() as stack:
        broker = stack.enter_context(RedisServer())
        fake = stack.enter_context(FakeCustomerIO(site_id="s", track_api_key="tk", app_api_key="ak"))
        broker_url = f"{broker.url}/0"
        env = worker_env(fake, broker_url, store_url, **ENV)
        producer = Celery("idem-bench", broker=broker_url, set_as_current=False)
        conf = {k.lower(): v for k, v in env.items() if k.startswith("CIO_")}
        conf["cio_spool_dir"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="cio-bench-spool-"))
        producer.conf.update(conf, broker_connection_retry_on_startup=True)
        import cio_celery.tasks  # noqa: F401 - registers the shared tasks

        producer.finalize(auto=True)
        workers = [WorkerProcess(env, concurrency=2, name=f"idem-bench{i}") for i in range(2)]
        try:
            for w in workers:
                w.start(broker_url)
            yield producer, fake, workers
        finally:
            for w in workers:
                w.stop(timeout=30)


def wait(what: str, cond: Callable[[], bool], timeout: float, workers: list[Any]) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            tails = "\n".join(w.tail(20) for w in workers)
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.2)


def deliver(producer: Celery, fake: FakeCustomerIO, workers: list[Any], n: int, caller: bool, tag: str) -> float:
    """Enqueue ``n`` operations and wait until all are applied and ended; returns the seconds."""
    started = time.monotonic()
    before = len(fake.applied)
    if caller:
        identify = producer.tasks["cio_celery.identify"]
        for i in range(n):
            identify.apply_async((f"user-{i}",), {"plan": "bench"}, idempotency_key=f"{tag}-signup-{i}")
    else:
        track = producer.tasks["cio_celery.track"]
        for i in range(n):
            track.delay(f"user-{i % 997}", "bench", {"seq": i, "tag": tag})
    wait(f"{n} deliveries", lambda: len(fake.applied) >= before + n, 30 + n / 20, workers)
    ledger = Ledger(settings_for_app(producer))
    wait("the ledger to empty", lambda: ledger.depth() == 0, 60, workers)
    time.sleep(1.5)  # the last done marks follow the answers
    return time.monotonic() - started


def phase_single(ops: int, caller_ops: int) -> dict[str, Any]:
    with RedisServer() as store:
        client = redis.Redis.from_url(f"{store.url}/0")
        with rig(f"{store.url}/0", [client]) as (producer, fake, workers):
            deliver(producer, fake, workers, 200, False, "warm")
            client.flushall()
            time.sleep(1.0)
            s0 = node_figures(client)
            took = deliver(producer, fake, workers, ops, False, "task")
            s1 = node_figures(client)
            task_keys = inspect(client)
            took_c = deliver(producer, fake, workers, caller_ops, True, "caller")
            s2 = node_figures(client)
            all_keys = inspect(client)
            dup_before = fake.stats["received"]
            deliver_dups(producer, caller_ops)
            claims = Claims(settings_for_app(producer))
            wait("the duplicates to be suppressed", lambda: sum(claims.suppressed().values()) >= caller_ops,
                 30 + caller_ops / 20, workers)
            time.sleep(1.0)
            suppressed = claims.suppressed()
        task = delta(s1, s0)
        caller = delta(s2, s1)
        return {
            "task_id_ops": ops, "seconds": round(took, 1), "ops_per_second": round(ops / took),
            "keyspace_bytes": task["keyspace_bytes"], "bytes_per_op": round(task["keyspace_bytes"] / ops, 2),
            "used_memory_bytes_per_op": round(task["used_memory"] / ops, 2),
            "store_reads_per_op": round(task["reads"] / ops, 2),
            "store_commands_per_op": round(task["commands"] / ops, 2),
            "keys_after_task_ops": task_keys,
            "caller_key_ops": caller_ops, "caller_seconds": round(took_c, 1),
            "caller_bytes_per_op": round(caller["keyspace_bytes"] / caller_ops, 2),
            "keys_after_both": all_keys,
            "caller_duplicates_sent_again_reached_customerio": fake.stats["received"] - dup_before,
            "suppressed": suppressed,
            "figures": {"before": s0, "after_task": s1, "after_caller": s2},
        }


def deliver_dups(producer: Celery, n: int) -> None:
    """The caller-key operations enqueued again: each must be suppressed."""
    identify = producer.tasks["cio_celery.identify"]
    for i in range(n):
        identify.apply_async((f"user-{i}",), {"plan": "bench"}, idempotency_key=f"caller-signup-{i}")


def phase_cluster(ops: int) -> dict[str, Any]:
    with RedisClusterServers() as cluster:
        clients = [redis.Redis.from_url(u) for u in cluster.node_urls]
        with rig(cluster.url, clients) as (producer, fake, workers):
            deliver(producer, fake, workers, 200, False, "warm")
            for c in clients:
                c.flushall()
            time.sleep(1.0)
            before = [node_figures(c) for c in clients]
            took = deliver(producer, fake, workers, ops, False, "task")
            after = [node_figures(c) for c in clients]
            kinds = [inspect(c) for c in clients]
        per_node = [delta(a, b) for a, b in zip(after, before, strict=True)]
        total = {k: sum(n[k] for n in per_node) for k in per_node[0]}
        return {
            "task_id_ops": ops, "seconds": round(took, 1), "ops_per_second": round(ops / took),
            "bytes_per_op": round(total["keyspace_bytes"] / ops, 2),
            "store_reads_per_op": round(total["reads"] / ops, 2),
            "store_commands_per_op": round(total["commands"] / ops, 2),
            "nodes": [{
                "keys": n["keys"], "key_share": round(n["keys"] / max(1, total["keys"]), 3),
                "command_share": round(n["commands"] / max(1, total["commands"]), 3),
                "read_share": round(n["reads"] / max(1, total["reads"]), 3),
                "evalsha_share": round(n["evalsha"] / max(1, total["evalsha"]), 3),
                "reads_per_op": round(n["reads"] / ops, 2), "commands_per_op": round(n["commands"] / ops, 2),
                "keyspace_bytes": n["keyspace_bytes"], "keys_by_kind": k["keys_by_kind"],
            } for n, k in zip(per_node, kinds, strict=True)],
        }


# -- phase 2: density --------------------------------------------------------------------------


def fill(client: redis.Redis, script: Any, marks_per_shard: int, shards: int, series: tuple[str, int, int],
         now_ms: int, rng: random.Random) -> None:
    sid, width, retention = series
    prefix = "{cio}:idem:"
    pipe = client.pipeline(transaction=False)
    pending = 0
    args: list[Any] = []
    for shard in range(shards):
        for _ in range(marks_per_shard):
            args += [str(rng.getrandbits(64) - (1 << 63)), rng.getrandbits(32), shard]
            if len(args) >= 900:
                script(keys=["{cio}:idem:index:0"], args=[now_ms, sid, width, retention, 512, prefix, *args],
                       client=pipe)
                args, pending = [], pending + 1
                if pending >= 20:
                    pipe.execute()
                    pending = 0
    if args:
        script(keys=["{cio}:idem:index:0"], args=[now_ms, sid, width, retention, 512, prefix, *args], client=pipe)
    pipe.execute()


def per_mark(client: redis.Redis, script: Any, density: float, series: tuple[str, int, int],
             rng: random.Random, steady: bool = True) -> dict[str, Any]:
    """Keyspace growth per mark of one bucket at ``density`` marks per shard. ``steady``: the
    bucket before held as many (it sets the level a bucket starts at, and the index exists)."""
    n = max(1, round(density))
    shards = max(2, min(SHARDS, FILL_MARKS // n))
    client.flushall()
    fill(client, script, 1, 1, series, int(time.time() * 1000), rng)  # the server's first allocations
    client.flushall()
    now = int(time.time() * 1000)
    if steady:
        fill(client, script, n, shards, series, now - series[1], rng)
    time.sleep(0.2)
    before = keyspace(client)
    fill(client, script, n, shards, series, now, rng)
    grown = keyspace(client) - before
    bucket = f"{series[0]}:{now // series[1]}"
    sets = sum(1 for _ in client.scan_iter(match=f"{{cio}}:idem:{bucket}:*", count=1000))
    levels = client.hget("{cio}:idem:index:0", bucket)
    return {"marks_per_shard_bucket": n, "sample_shards": shards, "sets_per_shard": round(sets / shards, 1),
            "levels_first_depth": levels.decode() if levels else None,
            "bytes_per_mark": round(grown / (n * shards), 2)}


def old_layout(client: redis.Redis, n: int = 200_000) -> float:
    client.flushall()
    time.sleep(0.2)
    before = keyspace(client)
    pipe = client.pipeline(transaction=False)
    for i in range(n):
        digest = random.getrandbits(256).to_bytes(32, "big").hex()
        pipe.set(f"{{cio}}:idem:{digest}", f"d:{random.getrandbits(128):032x}-0000", px=WEEK * 1000)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    return (keyspace(client) - before) / n


def phase_density() -> tuple[dict[str, Any], float, dict[str, Any]]:
    s = build_settings({}, environ={})
    task_ms, caller_ms = int(s.task_key_retention * 1000), int(s.caller_key_retention * 1000)
    series = {"task_id": (f"{bucket_ms(task_ms)}.{task_ms}", bucket_ms(task_ms), task_ms),
              "caller_key": (f"{bucket_ms(caller_ms)}.{caller_ms}", bucket_ms(caller_ms), caller_ms)}
    rng = random.Random(15)
    out: dict[str, Any] = {}
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        script = client.register_script(FILL)
        limit = client.config_get("set-max-intset-entries")
        for kind, (sid, width, retention) in series.items():
            for rate in RATES:
                density = rate * width / 1000 / SHARDS
                out[f"{kind}@{rate}"] = per_mark(client, script, density, (sid, width, retention), rng)
        old = old_layout(client)
        lookup = phase_lookup(client, s, series["task_id"], rng)
    out["set_max_intset_entries"] = limit
    return out, old, lookup


# -- phase 2b: the encodings Redis offers ---------------------------------------------------------


def phase_encodings(n: int = 200_000) -> dict[str, Any]:
    """Bytes per mark of each way to keep n marks, on a fresh server with its default limits:
    one string key each (the previous layout), hash fields of 8 bytes (listpack under
    hash-max-listpack-entries, hashtable over it), set members of 64 bits (intset under
    set-max-intset-entries, hashtable over it)."""
    rng = random.Random(7)
    out: dict[str, Any] = {}
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        config: Any = client.config_get("*-max-*-entries")
        hash_limit = int(config["hash-max-listpack-entries"])
        set_limit = int(config["set-max-intset-entries"])
        out["server"] = {k: config[k] for k in ("hash-max-listpack-entries", "set-max-intset-entries")}

        def measure(name: str, write: Callable[[Any, int], None]) -> None:
            client.flushall()
            time.sleep(0.2)
            before = keyspace(client)
            pipe = client.pipeline(transaction=False)
            for i in range(n):
                write(pipe, i)
                if i % 5000 == 4999:
                    pipe.execute()
            pipe.execute()
            some = next(iter(client.scan_iter(count=10)))
            out[name] = {"bytes_per_mark": round((keyspace(client) - before) / n, 1),
                         "encoding": client.object("encoding", some).decode()}

        def digest() -> bytes:
            return rng.getrandbits(64).to_bytes(8, "big")

        def member() -> int:
            return rng.getrandbits(64) - (1 << 63)

        measure("string key per mark (SET PX)", lambda p, i: p.set(
            f"{{cio}}:idem:{rng.getrandbits(256):064x}", f"d:{rng.getrandbits(128):032x}-0000", px=WEEK * 1000))
        per = max(1, hash_limit - 12)
        measure(f"hash fields, {per} per hash", lambda p, i: p.hset(f"{{cio}}:h:{i // per}", digest(), b""))
        measure(f"hash fields, {hash_limit + 100} per hash",
                lambda p, i: p.hset(f"{{cio}}:h:{i // (hash_limit + 100)}", digest(), b""))
        per = max(1, set_limit - 12)
        measure(f"set members, {per} per set", lambda p, i: p.sadd(f"{{cio}}:s:{i // per}", member()))
        measure(f"set members, {set_limit + 100} per set",
                lambda p, i: p.sadd(f"{{cio}}:s:{i // (set_limit + 100)}", member()))
    return out


# -- phase 4: lookup cost --------------------------------------------------------------------------


def phase_lookup(client: redis.Redis, s: Any, series: tuple[str, int, int], rng: random.Random) -> dict[str, Any]:
    """Redis CPU per claim and per done mark with a whole horizon of marks at 2,000 ops/s (in a
    sample of shards), against the previous layout's scripts on its own marks, in the same store:
    rounds alternate between the two, the medians are compared."""
    _sid, width, retention = series
    shards = 16
    client.flushall()
    script = client.register_script(FILL)
    now_ms = int(time.time() * 1000)
    density = round(2_000 * width / 1000 / SHARDS)
    for b in reversed(range(retention // width + 2)):  # every bucket the horizon spans, oldest first
        fill(client, script, density, shards, series, now_ms - b * width, rng)
    pipe = client.pipeline(transaction=False)
    for j in range(200_000):  # the previous layout's marks: one string each
        pipe.set(f"{{cio}}:idem:{rng.getrandbits(256):064x}", "d:x", px=retention)
        if j % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    port = client.connection_pool.connection_kwargs["port"]
    claims = Claims(build_settings({"redis_url": f"redis://127.0.0.1:{port}"}, environ={}))
    old_claim, old_done = client.script_load(OLD_CLAIM), client.script_load(OLD_DONE)
    counter = iter(range(10**9))

    def fresh(n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:  # keys in the sampled shards: a lookup that walks every bucket
            k = f"fresh-{next(counter)}"
            if claims.where("track", k).shard < shards:
                out.append(k)
        return out

    def usec(calls: list[tuple[str, list[Any]]]) -> tuple[float, list[Any]]:
        client.config_resetstat()
        p = client.pipeline(transaction=False)
        for sha, a in calls:
            p.evalsha(sha, *a)
        answers = p.execute()
        return float(client.info("commandstats")["cmdstat_evalsha"]["usec_per_call"]), answers

    rounds: dict[str, list[float]] = {"claim": [], "done": [], "old_claim": [], "old_done": []}
    for _ in range(5):
        keys = fresh(2000)
        made = [claims.claim_call("track", k, k) for k in keys]
        sha = client.script_load(made[0][0].text)
        t, answers = usec([(sha, [len(c.keys), *c.keys, *c.args]) for c, _k, _t in made])
        rounds["claim"].append(t)
        dones = [claims.done_call(Claims.claim_result(a, ck, tok), k)
                 for a, (_c, ck, tok), k in zip(answers, made, keys, strict=True)]
        dsha = client.script_load(dones[0].text)
        rounds["done"].append(usec([(dsha, [len(d.keys), *d.keys, *d.args]) for d in dones])[0])
        old_keys = [claims.keys_for("track", k + "-old") for k in keys]
        rounds["old_claim"].append(usec([(old_claim, [3, c, m, "{cio}:stats", "t", 75000, retention, "track"])
                                         for c, m in old_keys])[0])
        rounds["old_done"].append(usec([(old_done, [2, c, m, "t", retention, "task"]) for c, m in old_keys])[0])
    med = {k: sorted(v)[len(v) // 2] for k, v in rounds.items()}
    return {"marks_per_shard_bucket": density, "buckets": retention // width + 2, "rounds": rounds,
            "claim_usec_per_call": med["claim"], "done_usec_per_call": med["done"],
            "previous_claim_usec_per_call": med["old_claim"], "previous_done_usec_per_call": med["old_done"],
            "ratio": round((med["claim"] + med["done"]) / (med["old_claim"] + med["old_done"]), 2)}


# -- projection ----------------------------------------------------------------------------------


def project(density: dict[str, Any], old_bytes: float) -> dict[str, Any]:
    s = build_settings({}, environ={})
    out: dict[str, Any] = {}
    for kind, retention in (("task_id", s.task_key_retention), ("caller_key", s.caller_key_retention)):
        width = bucket_ms(int(retention * 1000)) / 1000
        life = retention + width / 2
        rows = {}
        for rate in RATES:
            b = density[f"{kind}@{rate}"]["bytes_per_mark"]
            alive = rate * min(life, WEEK) if kind == "caller_key" else rate * life
            rows[str(rate)] = {"marks_alive": round(alive), "bytes_per_mark": b, "gb": round(alive * b / GB, 3),
                               "previous_layout_gb": round(rate * min(WEEK, 7 * 86400) * old_bytes / GB, 1)}
        out[kind] = {"retention_s": retention, "bucket_s": width, "mean_life_s": round(life), "rates": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=10_000)
    parser.add_argument("--caller-ops", type=int, default=2_000)
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--fill", type=int, default=None, help="marks written per density measured")
    parser.add_argument("--encodings", action="store_true", help="only compare Redis' encodings (10 s)")
    args = parser.parse_args()
    if args.fill:
        global FILL_MARKS
        FILL_MARKS = args.fill
    started = time.monotonic()
    s = build_settings({}, environ={})
    print(f"defaults: task-id horizon {s.task_key_retention:.0f} s, caller keys {s.caller_key_retention:.0f} s")
    print("phase 2: encodings ...", flush=True)
    encodings = phase_encodings()
    if args.encodings:
        ENCODINGS.write_text(json.dumps(encodings, indent=2) + "\n")
        for name, row in encodings.items():
            print(f"  {name}: {row}")
        return
    print("phase 2/4: density and lookup cost ...", flush=True)
    density, old_bytes, lookup = phase_density()
    projection = project(density, old_bytes)
    print("phase 1: real deliveries, single store ...", flush=True)
    single = phase_single(args.ops, args.caller_ops)
    check = per_mark_at(single["task_id_ops"])
    cluster = None
    if not args.no_cluster:
        print("phase 5: real deliveries, cluster store ...", flush=True)
        cluster = phase_cluster(args.ops)
    result = {
        "benchmark": "idempotency_memory",
        "settings": {"task_key_retention_s": s.task_key_retention, "caller_key_retention_s": s.caller_key_retention,
                     "retry_horizon_s": s.retry_horizon},
        "deliveries": single,
        "model_at_the_delivery_runs_density": check,
        "encodings": encodings,
        "density": density,
        "previous_layout_bytes_per_mark": round(old_bytes, 1),
        "projection_week": projection,
        "lookup": lookup,
        "cluster": cluster,
        "seconds": round(time.monotonic() - started),
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    report(result)


def per_mark_at(ops: int) -> dict[str, Any]:
    """The density model at the real run's own density (its marks in one bucket, the first), to compare."""
    s = build_settings({}, environ={})
    ms = int(s.task_key_retention * 1000)
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url)
        return per_mark(client, client.register_script(FILL), ops / SHARDS,
                        (f"{bucket_ms(ms)}.{ms}", bucket_ms(ms), ms), random.Random(1), steady=False)


def report(r: dict[str, Any]) -> None:
    d = r["deliveries"]
    print(f"\nreal deliveries: {d['task_id_ops']} task-id ops at {d['ops_per_second']}/s: "
          f"{d['bytes_per_op']} B/op (keyspace), {d['used_memory_bytes_per_op']} B/op (used_memory); "
          f"the density model at that density: {r['model_at_the_delivery_runs_density']['bytes_per_mark']} B")
    print(f"  keys left: {d['keys_after_task_ops']}")
    print(f"  caller keys: {d['caller_bytes_per_op']} B/op; sent again: "
          f"{d['caller_duplicates_sent_again_reached_customerio']} reached Customer.io, suppressed {d['suppressed']}")
    print(f"  store read events per op {d['store_reads_per_op']}, commands per op {d['store_commands_per_op']}")
    print(f"previous layout: {r['previous_layout_bytes_per_mark']} B per mark")
    for name, row in r["encodings"].items():
        print(f"  {name}: {row}")
    for kind, p in r["projection_week"].items():
        print(f"\n{kind}: retention {p['retention_s']:.0f} s, bucket {p['bucket_s']:.0f} s")
        print("  ops/s   B/mark   marks alive      GB (a week)   previous layout GB")
        for rate, row in p["rates"].items():
            print(f"  {rate:>6} {row['bytes_per_mark']:>7} {row['marks_alive']:>14,} {row['gb']:>12}"
                  f" {row['previous_layout_gb']:>14}")
    lk = r["lookup"]
    print(f"\nclaim + done: {lk['claim_usec_per_call']} + {lk['done_usec_per_call']} us of Redis CPU (medians) with "
          f"{lk['buckets']} buckets at 2,000 ops/s density; previous layout {lk['previous_claim_usec_per_call']} + "
          f"{lk['previous_done_usec_per_call']} us (x{lk['ratio']})")
    if r["cluster"]:
        c = r["cluster"]
        print(f"\ncluster: {c['ops_per_second']} ops/s, {c['bytes_per_op']} B/op, read events per op "
              f"{c['store_reads_per_op']} (single: {d['store_reads_per_op']}), commands per op "
              f"{c['store_commands_per_op']} (single: {d['store_commands_per_op']})")
        for i, n in enumerate(c["nodes"]):
            print(f"  node {i}: keys {n['keys']} ({n['key_share']:.0%}), commands {n['command_share']:.0%}, "
                  f"read events {n['read_share']:.0%} ({n['reads_per_op']}/op), evalsha {n['evalsha_share']:.0%}")
    print(f"\n{r['seconds']} s; figures in {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
