"""The Redis store of one process: connected lazily, never at import, never shared across a fork.

The store is one Redis (``redis://``, ``rediss://``, ``unix://``, ``django-redis://``) or a Redis
Cluster (``redis+cluster://host:port``, ``rediss+cluster://``; see docs/cluster.md). Keys that
are not per operation (breaker, limiter, fallback, dead letters, quarantine, ledger, stats) share
the ``{prefix}`` hash tag: one slot. Per-operation keys (claims, attempt markers, done marks)
carry the tag of their operation's shard (:func:`shard_tag`): on a cluster ``{prefix:N}``, which
spreads them across the slots; on one Redis ``{prefix}`` like the rest.

:func:`run_scripts` and :func:`run_pipelined` send several scripts in one round trip. On one
Redis that is one script (atomic) or one pipeline. On a cluster, scripts of one slot are still
combined into one; scripts of different slots go in one pipelined call per node, sent to every
node before any answer is read. A call marked ``after_others`` waits for the calls before it
to succeed, in a round trip of its own (the dead letter's mark on its claim, after the dead letter).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from ._process import PerProcess
from .exceptions import ConfigurationError
from .settings import Settings

__all__ = [
    "CLUSTER_SCHEMES",
    "READ_COUNT_LUA",
    "SHARDS",
    "ScriptCall",
    "combine",
    "count_of",
    "is_cluster",
    "key",
    "redis_for",
    "run_pipelined",
    "run_script",
    "run_scripts",
    "shard_tag",
]

_clients: PerProcess[redis.Redis] = PerProcess()
_scripts: PerProcess[Script] = PerProcess()


# A redis_url of this form names a django-redis cache alias whose connection pool is reused.
DJANGO_REDIS_SCHEME = "django-redis://"

# A redis_url of one of these schemes names a Redis Cluster (any of its masters; the client
# discovers the others), and the plain scheme redis-py's cluster client is given.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# Shards of the per-operation keys: on a cluster, each has its own hash tag (slot). 1,024 tags
# put 341 +- 15 of them on each of 3 masters; a store-wide read (the suppressed counters) is a
# pipeline of 1,024 small commands.
SHARDS = 1024


# A Lua function for the byte counts kept beside capped lists and hashes (fallback, batching
# buffer, dead letters): a non-negative integer, as the scripts write it. Anything else (damaged
# by hand, another type, or "inf" and "nan", which Lua's tonumber reads as numbers) reads 0, and
# the script that read it overwrites it with its own figure.
READ_COUNT_LUA = """
local function read_count(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'string' and string.match(v, '^%d+$') then return tonumber(v) end
  return 0
end
"""


def count_of(value: Any) -> int:
    """A byte count read in Python, as ``read_count`` reads it in Lua (anything but a
    non-negative integer is 0)."""
    try:
        n = int(value or 0)
    except (TypeError, ValueError):
        return 0
    return max(0, n)


def is_cluster(settings: Settings) -> bool:
    """Whether the store is a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return settings.store_is_cluster


def redis_for(settings: Settings, timeout: float | None = None) -> redis.Redis:
    """This process's client for the store; raises ConfigurationError if none is configured.

    ``timeout``: a client of its own whose reads and connects give up after that many seconds
    and are not retried (a caller's ``.delay()`` asking the store, which must not wait); a
    django-redis store keeps its own pool's timeouts.
    """
    url = settings.redis_url
    if not url:
        raise ConfigurationError(
            "redis_url", "is not set and the Celery broker is not Redis (set CIO_REDIS_URL)"
        )
    if url.startswith(DJANGO_REDIS_SCHEME):
        # Reuse a django-redis connection pool: redis_url = "django-redis://<cache alias>".
        alias = url[len(DJANGO_REDIS_SCHEME):] or "default"

        def from_django() -> redis.Redis:
            from django_redis import get_redis_connection

            return get_redis_connection(alias)  # type: ignore[no-any-return]

        return _clients.get(url, from_django)
    # A store that accepts connections and does not answer (shutting down, paused) must fail a
    # delivery attempt well within its hard time limit: the attempt then becomes a free retry
    # instead of a worker process killed by the pool.
    quick = timeout is not None
    if timeout is None:
        timeout = min(5.0, max(0.25, settings.task_time_limit / 5))
    scheme, _, rest = url.partition(":")
    if scheme in CLUSTER_SCHEMES:
        plain = f"{CLUSTER_SCHEMES[scheme]}:{rest}"

        def cluster() -> redis.Redis:
            from redis.cluster import RedisCluster

            extra: dict[str, Any] = {"cluster_error_retry_attempts": 0} if quick else {}
            client = RedisCluster.from_url(
                plain, socket_timeout=timeout, socket_connect_timeout=min(2.0, timeout),
                health_check_interval=15, decode_responses=False, **extra,
            )
            # The cluster client has the same command methods; only scripts and pipelines across
            # slots need this module's care (run_scripts, run_pipelined).
            return cast(redis.Redis, client)

        return _clients.get((url, timeout, quick), cluster)
    return _clients.get(
        (url, timeout, quick),
        lambda: redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=min(2.0, timeout),
            health_check_interval=15, decode_responses=False,
            **({"retry_on_timeout": False, "retry": None} if quick else {}),
        ),
    )


def key(settings: Settings, *parts: str) -> str:
    """A store key that is not per operation; the ``{prefix}`` hash tag keeps all of them in one
    Redis Cluster slot (breaker, limiter, fallback, dead letters, quarantine, ledger, stats)."""
    return ":".join(("{" + settings.key_prefix + "}", *parts))


def shard_tag(settings: Settings, shard: int) -> str:
    """The hash tag of per-operation keys of ``shard`` (0 <= shard < SHARDS): ``{prefix:shard}``
    on a cluster, ``{prefix}`` on one Redis."""
    if is_cluster(settings):
        return "{" + f"{settings.key_prefix}:{shard}" + "}"
    return "{" + settings.key_prefix + "}"


def run_script(settings: Settings, text: str, keys: Sequence[str], args: Sequence[Any],
               timeout: float | None = None) -> Any:
    """Run a Lua script by its SHA (EVALSHA), loading it once per server, not sending it every call.

    ``timeout``: on a client that gives up after that many seconds, without retries (see
    :func:`redis_for`)."""
    return _script(settings, text)(keys=list(keys), args=list(args), client=redis_for(settings, timeout))


@dataclass(frozen=True)
class ScriptCall:
    """One Lua script run, to be sent with others in one round trip by :func:`run_scripts`.

    ``after_others``: on a cluster, this call runs only once the calls before it (in the same
    :func:`run_scripts` list or :func:`combine`) have succeeded, in a later round trip, when
    they are not all in its slot. On one Redis the calls are one script anyway. ``parts``: the
    calls a :func:`combine` is made of (a cluster splits them by slot).
    """

    text: str
    keys: Sequence[str]
    args: Sequence[Any]
    after_others: bool = False
    parts: tuple[ScriptCall, ...] = ()


def _script(settings: Settings, text: str) -> Script:
    client = redis_for(settings)
    return _scripts.get((settings.redis_url, text), lambda: client.register_script(text))


@functools.lru_cache(maxsize=64)
def _combined(texts: tuple[str, ...]) -> str:
    """One Lua script running ``texts`` in order, each as a function of its own KEYS and ARGV.

    ARGV starts with each script's key and argument counts; then come the scripts' arguments,
    and KEYS holds their keys, one after the other. The answer is the list of their answers.
    """
    functions = "\n".join(f"local function s{i}(KEYS, ARGV)\n{text}\nend" for i, text in enumerate(texts))
    names = ", ".join(f"s{i}" for i in range(len(texts)))
    return f"""{functions}
local fns = {{{names}}}
local n = #fns
local kpos, apos = 1, 2 * n + 1
local out = {{}}
for i = 1, n do
  local nk, na = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local k, a = {{}}, {{}}
  for j = 1, nk do k[j] = KEYS[kpos + j - 1] end
  for j = 1, na do a[j] = ARGV[apos + j - 1] end
  kpos = kpos + nk
  apos = apos + na
  local r = fns[i](k, a)
  if r == nil then r = false end
  -- An error answer (redis.error_reply) stops the scripts after it and is raised.
  if type(r) == 'table' and r.err then return r end
  out[i] = r
end
return out
"""


def run_scripts(settings: Settings, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run several scripts in one round trip, as one Lua script (one EVALSHA).

    The scripts run in order, atomically together; an error in one stops the ones after it
    and is raised. On a cluster, the scripts of each slot run as one script, in order; the
    slots' scripts go together in one pipelined call per node, except a call marked
    ``after_others``, which follows in a round trip of its own if the ones before it succeeded.
    An error stops what has not been sent yet and is raised; scripts of other slots sent in
    the same round trip have run (see docs/cluster.md for what that means).
    """
    if is_cluster(settings):
        return _nest(calls, _answer(_run_cluster(settings, [_parts(calls)])[0]))
    if len(calls) == 1:
        c = calls[0]
        return [run_script(settings, c.text, c.keys, c.args)]
    one = combine(calls)
    result: list[Any] = run_script(settings, one.text, one.keys, one.args)
    return result


def combine(calls: Sequence[ScriptCall]) -> ScriptCall:
    """One script call running ``calls`` in order, atomically; it answers the list of their
    answers (see :func:`run_scripts`; :func:`run_pipelined` sends many such in one round trip).

    On a cluster, :func:`run_pipelined` runs its parts per slot, as :func:`run_scripts` does."""
    keys: list[str] = []
    args: list[Any] = []
    for c in calls:
        args += [len(c.keys), len(c.args)]
    for c in calls:
        keys += list(c.keys)
        args += list(c.args)
    return ScriptCall(_combined(tuple(c.text for c in calls)), keys, args, parts=_parts(calls))


def run_pipelined(settings: Settings, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run many scripts in one round trip as a pipeline of EVALSHA (each atomic on its own).

    For long lists of the same scripts (a batch's claims), where one combined script would
    be a new script per list length. A script the server does not know yet (NOSCRIPT, after
    a restart or a failover) did not run: it is loaded and run again alone. The first
    script error is raised after the others have run. On a cluster, one pipelined call per
    node; a :func:`combine` whose parts are in several slots runs as :func:`run_scripts` does.
    """
    if is_cluster(settings):
        answers = _run_cluster(settings, [c.parts or (c,) for c in calls])
        first = next((a for a in answers if isinstance(a, BaseException)), None)
        if first is not None:
            raise first
        return [_nest([c], _answer(a))[0] for c, a in zip(calls, answers, strict=True)]
    client = redis_for(settings)
    scripts = [_script(settings, c.text) for c in calls]
    pipe = client.pipeline(transaction=False)
    for script, c in zip(scripts, calls, strict=True):
        pipe.evalsha(script.sha, len(c.keys), *c.keys, *c.args)
    results: list[Any] = pipe.execute(raise_on_error=False)
    error: BaseException | None = None
    for i, res in enumerate(results):
        if isinstance(res, NoScriptError):
            results[i] = scripts[i](keys=list(calls[i].keys), args=list(calls[i].args), client=client)
        elif isinstance(res, BaseException) and error is None:
            error = res
    if error is not None:
        raise error
    return results


# -- Redis Cluster ---------------------------------------------------------------------------


def _parts(calls: Sequence[ScriptCall]) -> tuple[ScriptCall, ...]:
    """The plain calls of ``calls``, combined ones opened up, in order."""
    out: list[ScriptCall] = []
    for c in calls:
        out += list(_parts(c.parts)) if c.parts else [c]
    return tuple(out)


def _nest(calls: Sequence[ScriptCall], flat: list[Any]) -> list[Any]:
    """Answers of ``calls`` from the answers of their plain parts (a combined call answers a list)."""
    out: list[Any] = []
    i = 0
    for c in calls:
        n = len(_parts([c]))
        out.append(_nest(c.parts, flat[i:i + n]) if c.parts else flat[i])
        i += n
    return out


def _answer(result: list[Any] | BaseException) -> list[Any]:
    if isinstance(result, BaseException):
        raise result
    return result


def _slot(call: ScriptCall) -> int:
    """The one slot of a call's keys (a script cannot span slots on a cluster)."""
    slots = {key_slot(k.encode() if isinstance(k, str) else bytes(k)) for k in call.keys}
    if len(slots) > 1:
        raise ValueError(f"a store script's keys are in {len(slots)} cluster slots: {list(call.keys)[:4]}")
    return slots.pop() if slots else 0


def _phases(parts: Sequence[ScriptCall]) -> list[dict[int, list[int]]]:
    """The round trips of one unit: in each, the positions of its parts per slot, in order."""
    phases: list[dict[int, list[int]]] = [{}]
    for i, part in enumerate(parts):
        slot = _slot(part)
        current = phases[-1]
        if part.after_others and current and set(current) != {slot}:
            current = {}
            phases.append(current)
        current.setdefault(slot, []).append(i)
    return phases


def _run_cluster(settings: Settings, units: Sequence[Sequence[ScriptCall]]) -> list[list[Any] | BaseException]:
    """Run units of calls on a cluster; each answers the list of its calls' answers, or the
    first error that stopped it. Per round trip, the calls of one unit and one slot are one
    script; all of them go in one pipelined call per node."""
    plans = [_phases(parts) for parts in units]
    answers: list[list[Any]] = [[None] * len(parts) for parts in units]
    errors: list[BaseException | None] = [None] * len(units)
    for n in range(max((len(p) for p in plans), default=0)):
        batch: list[tuple[int, list[int]]] = []
        calls: list[ScriptCall] = []
        for u, plan in enumerate(plans):
            if errors[u] is not None or n >= len(plan):
                continue
            for positions in plan[n].values():
                group = [units[u][i] for i in positions]
                batch.append((u, positions))
                calls.append(group[0] if len(group) == 1 else combine(group))
        try:
            results = _pipeline_cluster(settings, calls)
        except Exception as exc:  # noqa: BLE001 - the whole round trip failed: every unit in it stops
            results = [exc] * len(calls)
        for (u, positions), res in zip(batch, results, strict=True):
            if isinstance(res, BaseException):
                errors[u] = errors[u] or res
                continue
            values = res if len(positions) > 1 else [res]
            for i, value in zip(positions, values, strict=True):
                answers[u][i] = value
    return [err if err is not None else ans for ans, err in zip(answers, errors, strict=True)]


def _pipeline_cluster(settings: Settings, calls: Sequence[ScriptCall]) -> list[Any]:
    """EVALSHA each call (one slot each) in one pipelined call per node. Scripts a node did not
    know (NOSCRIPT: not run) are loaded on every master and those calls sent again, together.
    Errors are returned in place, not raised."""
    if not calls:
        return []
    client: Any = redis_for(settings)
    results = _evalsha_cluster(client, [(_script(settings, c.text).sha, c) for c in calls])
    missing = [i for i, res in enumerate(results) if isinstance(res, NoScriptError)]
    if missing:
        for text in {calls[i].text for i in missing}:
            client.script_load(text)
        for i, res in zip(missing, _evalsha_cluster(client, [(_script(settings, calls[i].text).sha, calls[i])
                                                               for i in missing]), strict=True):
            results[i] = res
    return results


def _evalsha_cluster(client: Any, calls: Sequence[tuple[str, ScriptCall]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for sha, c in calls:
        # redis-py's cluster pipeline refuses its evalsha() method, not the command. It writes to
        # every node before reading any answer. The node is named here, from the client's slot
        # map: left to find it, the pipeline asks the server for the command's keys first (one
        # more round trip per script). A script whose slot has moved is answered MOVED and sent
        # again by the client, routed by its keys.
        target = client.get_node_from_key(c.keys[0]) if c.keys else client.get_random_node()
        pipe.execute_command("EVALSHA", sha, len(c.keys), *c.keys, *c.args, target_nodes=target)
    results: list[Any] = pipe.execute(raise_on_error=False)
    return results
