"""Adaptive batching: past the rate limit, batchable operations leave in ``/api/v2/batch`` requests.

Customer.io limits the Track API by requests, not operations. Below the limit each operation
goes alone, at today's latency. Past it, one request per operation builds a backlog however many
workers run; a v2 batch carries up to 1,000 operations in one request.

Admission (one Lua script per attempt of a batchable operation, instead of the guard's three):

- the breaker is not closed: as before (a rejection parks the operation; a half-open probe goes
  alone);
- the buffer already holds operations, or the message waited in its queue longer than
  ``batch_linger`` (the workers are behind: a backlog is drained in batches, not at the single
  path's pace), or more batchable operations arrived during the last second than the rate limit
  lets single requests go, or no rate-limit slot is free within ``rate_limit_max_sleep``: the
  operation is appended to the buffer and its message is acknowledged. No claim is taken and no
  slot is reserved; its ledger entry goes (the buffer is durable, in the store);
- otherwise it takes its slot and its claim, and goes alone.

The drainer (:class:`Coalescer`, a thread in each worker; a lease lets one of them drain at a
time) takes the oldest operations when ``batch_min_size`` of them wait, or the oldest waited
``batch_linger``, and a rate-limit slot is free: batches never outrun the limit, and under heavier
load they grow instead (up to ``batch_max_operations`` and 500 KB). Each leaves as a
``cio_celery.deliver_batch`` task on the fallback queue (not behind a backlog of the main
queue), which keeps every guarantee per item
(claims, done marks, 207 per item, event ids: see batching.py). An operation that cannot join a
batch (no v2 form, over 32 KB) is published alone, marked so that it is never coalesced again.

At enqueue (``batch_at_enqueue``, :func:`buffer_at_enqueue`): past the limit, ``.delay()`` of a
batchable operation appends it to the same buffer itself, in one store round trip, instead of
publishing one Celery message that a worker would take, admit and acknowledge only to append it
there. The call returns once the store holds the entry, which is as durable as a published
message (both are a Redis write; the buffer is drained by the same drainer, its entries removed
only once their batch is published). The store decides in one script: a worker's drainer holds its lease
(none would drain an entry of a producer whose workers run with batching off), the breaker is
closed, the buffer is below its cap, and it already holds operations or more batchable operations
arrived during the last second than single requests carry. Otherwise, or when the store does not
answer, the operation is published as usual; a process that heard "not now" publishes as usual
for the next ``ENQUEUE_RECHECK`` seconds without asking (light load costs one round trip a tenth
of a second, not one a call), one whose store failed for ``ENQUEUE_BACKOFF`` seconds.

Keys: ``{prefix}:coalesce`` (list of entries, as parked ones), ``{prefix}:coalesce:since`` (ms
when the buffer last became non-empty), ``{prefix}:coalesce:arrivals`` (hash: unix second ->
arrivals), ``{prefix}:coalesce:bytes`` (the bytes the list holds, counted by every append and
every trim, against ``batch_buffer_max_bytes``), ``{prefix}:coalesce:drainer`` (the drainer's
lease), ``{prefix}:coalesce:inflight`` (sorted set: the task ids of the buffer's batches being
delivered -> when each is presumed over; at most ``batch_max_in_flight`` of them).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
import time
from typing import Any

from ._process import PerProcess
from .fallback import Fallback
from .limiter import Limiter
from .operations import BATCHABLE
from .settings import Settings
from .store import READ_COUNT_LUA, ScriptCall, key, run_script
from .validation import BATCH_OPERATION_MAX_BYTES

__all__ = ["CLAIM_LATER", "Coalescer", "admit_call", "buffer_at_enqueue", "buffered_at_enqueue", "coalescing"]

logger = logging.getLogger("cio_celery.coalesce")

# Most operations the buffer holds; past it they go alone (a drainer is missing or far behind).
# Its bytes are capped too, by the setting ``batch_buffer_max_bytes``.
COALESCE_MAX = 100_000
# Entries larger than a batch item may be go alone (published as usual, or delivered by the
# worker that holds them): the drainer would send them alone anyway.
MAX_ENTRY = BATCH_OPERATION_MAX_BYTES

# On a Redis Cluster store the admission script runs without the claim (another slot): this
# stands in for it, and the operation that goes alone claims in a second round trip.
CLAIM_LATER = "return 'later'"

# A breaker turned off still answers "allow" to the admission script.
_ALLOW = "return {'allow', '0', '0', ''}"


def coalescing(settings: Settings, limiter: Limiter) -> bool:
    """Whether batchable operations may be coalesced: on, with a Track rate limit and claims."""
    return settings.batch_coalesce and settings.idempotency_enabled and limiter.rate_of("track") > 0


# The buffer's bookkeeping, shared by the workers' admission and the callers' append, so that
# both count arrivals and start the buffer's age the same way. ``t`` is a Redis TIME answer.
_BUFFER_LUA = READ_COUNT_LUA + """
local function time_ms(t)
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- One more batchable arrival in second ``sec``; the hash keeps the last two seconds: the first
-- arrival of a second drops every other field (not only sec - 2, which would leave one field
-- behind for every gap of two seconds or more while the key's expiry kept being renewed).
local function count_arrival(arrivals, sec)
  if redis.call('HINCRBY', arrivals, tostring(sec), 1) == 1 then
    local now, before = tostring(sec), tostring(sec - 1)
    for _, f in ipairs(redis.call('HKEYS', arrivals)) do
      if f ~= now and f ~= before then redis.call('HDEL', arrivals, f) end
    end
    redis.call('EXPIRE', arrivals, 5)
  end
end
-- Arrivals during the second before ``sec``.
local function arrived_before(arrivals, sec)
  return tonumber(redis.call('HGET', arrivals, tostring(sec - 1)) or '0') or 0
end
-- Whether ``entry`` fits: fewer than ``max_n`` entries held, and (unless the buffer is empty,
-- where the count restarts) at most ``max_bytes`` bytes with it. Past either, it goes alone.
local function has_room(depth, bytes, entry, max_n, max_bytes)
  if depth >= max_n then return false end
  return depth == 0 or read_count(bytes) + #entry <= max_bytes
end
-- Append ``entry`` and count its bytes; the buffer's age starts when it stops being empty.
local function append(buffer, since, bytes, entry, t)
  if redis.call('RPUSH', buffer, entry) == 1 then
    redis.call('SET', since, tostring(time_ms(t)))
    redis.call('SET', bytes, tostring(#entry))
  else
    redis.call('SET', bytes, tostring(read_count(bytes) + #entry))
  end
end
"""


@functools.lru_cache(maxsize=8)
def _admit_text(claim: str, acquire: str, slot: str) -> str:
    return f"""{_BUFFER_LUA}
local function s_claim(KEYS, ARGV)
{claim}
end
local function s_acquire(KEYS, ARGV)
{acquire}
end
local function s_slot(KEYS, ARGV)
{slot}
end
-- ARGV starts with the key and argument counts of the four parts (claim, acquire, slot,
-- coalesce); then come their arguments, and KEYS holds their keys, one part after the other.
local kpos, apos, g = 1, 9, {{}}
for i = 1, 4 do
  local nk, na = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local k, a = {{}}, {{}}
  for j = 1, nk do k[j] = KEYS[kpos + j - 1] end
  for j = 1, na do a[j] = ARGV[apos + j - 1] end
  kpos, apos = kpos + nk, apos + na
  g[i] = {{k, a}}
end
-- coalesce part: KEYS buffer, since, arrivals, ledger entries, ledger due, the buffer's bytes;
-- ARGV entry, task id, single requests per second, ledger on (1/0), behind (1/0: the message
-- waited in its queue longer than the linger), the buffer's cap in entries, and in bytes.
local ck, ca = g[4][1], g[4][2]
local permit = s_acquire(g[2][1], g[2][2])
if permit[1] == 'reject' then return {{false, permit, false, false}} end
if permit[1] ~= 'allow' then
  return {{s_claim(g[1][1], g[1][2]), permit, s_slot(g[3][1], g[3][2]), false}}
end
local t = redis.call('TIME')
local sec = tonumber(t[1])
local arrived = arrived_before(ck[3], sec)
count_arrival(ck[3], sec)
local depth = redis.call('LLEN', ck[1])
local buffered = depth > 0
local slot = false
local go = buffered or ca[5] == '1' or arrived > tonumber(ca[3])
if not go then
  slot = s_slot(g[3][1], g[3][2])
  go = slot[1] == 0
end
-- A buffer that nobody drains (no worker with the drainer) stops growing: alone, as before.
if go and has_room(depth, ck[6], ca[1], tonumber(ca[6]), tonumber(ca[7])) then
  append(ck[1], ck[2], ck[6], ca[1], t)
  if ca[4] == '1' then
    redis.call('HDEL', ck[4], ca[2])
    redis.call('ZREM', ck[5], ca[2])
  end
  return {{false, permit, slot, 'coalesced'}}
end
if not slot then slot = s_slot(g[3][1], g[3][2]) end
return {{s_claim(g[1][1], g[1][2]), permit, slot, false}}
"""


def admit_call(settings: Settings, claim: ScriptCall, acquire: ScriptCall | None, slot: ScriptCall,
               entry: str, task_id: str, single_rate: float, ledger_keys: list[str] | None,
               behind: bool = False) -> ScriptCall:
    """The admission script of one batchable operation (see the module docstring).

    ``slot`` must decline a far slot (``late=0``); ``acquire`` is None when the breaker is off.
    Answers ``[claim answer or False, permit answer, slot answer or False, 'coalesced' or False]``.
    """
    acq = acquire or ScriptCall(_ALLOW, [], [])
    ledger = ledger_keys or [key(settings, "ledger"), key(settings, "ledger", "due")]
    extra = ScriptCall("", [key(settings, "coalesce"), key(settings, "coalesce", "since"),
                            key(settings, "coalesce", "arrivals"), *ledger, key(settings, "coalesce", "bytes")],
                       [entry, task_id, repr(single_rate), "1" if ledger_keys else "0", "1" if behind else "0",
                        COALESCE_MAX, settings.batch_buffer_max_bytes])
    parts = (claim, acq, slot, extra)
    keys: list[str] = []
    args: list[Any] = []
    for c in parts:
        args += [len(c.keys), len(c.args)]
    for c in parts:
        keys += list(c.keys)
        args += list(c.args)
    return ScriptCall(_admit_text(claim.text, acq.text, slot.text), keys, args)


# Seconds a producer that heard "not now" publishes as usual before it asks the store again, and
# seconds it does so after the store failed to answer.
ENQUEUE_RECHECK = 0.1
ENQUEUE_BACKOFF = 30.0
# The longest the caller's store check may take (connect or answer, no retry): past it the
# operation is published as usual, so `.delay()` waits at most this plus `enqueue_timeout`.
ENQUEUE_STORE_TIMEOUT = 0.1

# KEYS: buffer, since, arrivals, breaker state, drainer lease, stats, the buffer's bytes. ARGV:
# entry, single requests per second, cap in entries, cap in bytes. 1: appended; 0: publish the
# operation as usual.
_ENQUEUE = _BUFFER_LUA + """
-- No worker drains the buffer (none runs, or they run with batching off): a message waits for
-- a worker in the broker, an entry here would wait for nobody.
if redis.call('EXISTS', KEYS[5]) == 0 then return 0 end
local st = redis.pcall('HGET', KEYS[4], 'st')
if type(st) == 'table' or (st and st ~= '0') then return 0 end
local depth = redis.call('LLEN', KEYS[1])
if not has_room(depth, KEYS[7], ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])) then return 0 end
local t = redis.call('TIME')
local sec = tonumber(t[1])
if depth == 0 and arrived_before(KEYS[3], sec) <= tonumber(ARGV[2]) then return 0 end
count_arrival(KEYS[3], sec)
append(KEYS[1], KEYS[2], KEYS[7], ARGV[1], t)
redis.call('HINCRBY', KEYS[6], 'enqueue:appended', 1)
return 1
"""


class _EnqueuePlan:
    """What a producer needs to buffer at enqueue for one settings object (built once)."""

    def __init__(self, settings: Settings) -> None:
        from .breaker import breaker_for

        self.settings = settings
        limiter = Limiter(settings)
        self.enabled = settings.batch_at_enqueue and coalescing(settings, limiter)
        self.rate = repr(limiter.rate_of("track"))
        state = [key(settings, "breaker", "state-off")]
        if settings.breaker_enabled:
            state = [breaker_for(settings).state_key]
        self.keys = [key(settings, "coalesce"), key(settings, "coalesce", "since"),
                     key(settings, "coalesce", "arrivals"), *state, key(settings, "coalesce", "drainer"),
                     key(settings, "stats"), key(settings, "coalesce", "bytes")]
        self.not_before = 0.0  # monotonic: publish as usual until then
        self.buffered = 0


_plans: PerProcess[_EnqueuePlan] = PerProcess()


def _plan_for(settings: Settings) -> _EnqueuePlan:
    """This process's plan for ``settings`` (rebuilt if another object took its id)."""
    plan = _plans.get(id(settings), lambda: _EnqueuePlan(settings))
    if plan.settings is not settings:
        plan = _EnqueuePlan(settings)
        _plans.put(id(settings), plan)
    return plan


def buffer_at_enqueue(settings: Settings, operation: str, task_id: str, args: list[Any],
                      kwargs: dict[str, Any]) -> bool:
    """Append a new batchable operation to the batching buffer if the workers are past the
    limit (see the module docstring); False: publish it as usual. Never raises."""
    if operation not in BATCHABLE:
        return False
    plan = _plan_for(settings)
    if not plan.enabled:
        return False
    now = time.monotonic()
    if now < plan.not_before:
        return False
    try:
        entry = json.dumps({"operation": operation, "task_id": task_id, "args": args, "kwargs": kwargs},
                           separators=(",", ":"))
    except (TypeError, ValueError):
        return False  # the worker's json serializer names the problem when it is published
    if len(entry) > MAX_ENTRY:
        return False
    try:
        took = int(run_script(settings, _ENQUEUE, plan.keys,
                              [entry, plan.rate, COALESCE_MAX, settings.batch_buffer_max_bytes],
                              timeout=ENQUEUE_STORE_TIMEOUT))
    except Exception as exc:  # noqa: BLE001 - the store is down or slow: the broker takes it
        plan.not_before = now + ENQUEUE_BACKOFF
        logger.warning("cio_celery batching at enqueue paused for %.0f s: the store failed (%s)",
                       ENQUEUE_BACKOFF, type(exc).__name__)
        return False
    if not took:
        plan.not_before = now + ENQUEUE_RECHECK
        return False
    plan.buffered += 1
    return True


def buffered_at_enqueue(settings: Settings) -> int:
    """How many operations this process appended to the buffer at enqueue with ``settings``."""
    return _plan_for(settings).buffered


# The batches in flight (a sorted set: task id -> when it is presumed over, unix ms): a key of
# another type is replaced or ignored (a damaged store must not stop the drainer).
_IN_FLIGHT_LUA = _BUFFER_LUA + """
local function flight_kind(k)
  local kind = redis.call('TYPE', k)
  return kind.ok or kind
end
"""

# KEYS: buffer, since, batches in flight. The buffer's length, its age's start and the time
# (ms), and how many of its batches are being delivered (those presumed over dropped first).
_PEEK = _IN_FLIGHT_LUA + """
local now = time_ms(redis.call('TIME'))
local flying = 0
local kind = flight_kind(KEYS[3])
if kind == 'zset' then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  flying = redis.call('ZCARD', KEYS[3])
elseif kind ~= 'none' then
  redis.call('DEL', KEYS[3])
end
return {redis.call('LLEN', KEYS[1]), redis.call('GET', KEYS[2]) or false, now, flying}
"""

# KEYS: batches in flight. ARGV: task id, lease ms. A batch is about to be published: it counts
# for its lease from now.
_PUBLISHING = _IN_FLIGHT_LUA + """
local kind = flight_kind(KEYS[1])
if kind ~= 'zset' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
redis.call('ZADD', KEYS[1], time_ms(redis.call('TIME')) + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: batches in flight. ARGV: task id, lease ms. A batch task starts: one still counted
# counts until its lease from now (it may have waited in the queue since its publish).
_STARTED = _IN_FLIGHT_LUA + """
if flight_kind(KEYS[1]) ~= 'zset' then return 0 end
return redis.call('ZADD', KEYS[1], 'XX', time_ms(redis.call('TIME')) + tonumber(ARGV[2]), ARGV[1])
"""

# KEYS: batches in flight. ARGV: task id. A batch task ends (delivered, retried later or
# requeued: a batch back in the broker no longer counts).
_LANDED = _IN_FLIGHT_LUA + """
if flight_kind(KEYS[1]) ~= 'zset' then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def in_flight_key(settings: Settings) -> str:
    """The sorted set of the batching buffer's batches being delivered (see :class:`Coalescer`)."""
    return key(settings, "coalesce", "inflight")


def batch_lease_ms(settings: Settings) -> int:
    """How long a batch counts as in flight without news of its end: its task's hard time limit
    and 5 s."""
    return int(settings.task_time_limit * 1000) + 5000


def batch_publishing(settings: Settings, task_id: str) -> None:
    """A batch is about to be published: it counts against ``batch_max_in_flight`` (raises on a
    store error: the drainer then publishes nothing and tries again)."""
    run_script(settings, _PUBLISHING, [in_flight_key(settings)], [task_id, batch_lease_ms(settings)])


def batch_started(settings: Settings, task_id: str) -> None:
    """A batch task starts: if it still counts, it counts for its lease from now. Best effort."""
    try:
        run_script(settings, _STARTED, [in_flight_key(settings)], [task_id, batch_lease_ms(settings)])
    except Exception as exc:  # noqa: BLE001 - its lease from the publish still holds
        logger.warning("cio_celery batch start not recorded: %s", type(exc).__name__)


def batch_landed(settings: Settings, task_id: str) -> None:
    """A batch task ends: it no longer counts against ``batch_max_in_flight``. Best effort (a
    batch whose end is not recorded counts until its lease ends)."""
    try:
        run_script(settings, _LANDED, [in_flight_key(settings)], [task_id])
    except Exception as exc:  # noqa: BLE001 - the lease ends it anyway
        logger.warning("cio_celery batch end not recorded: %s", type(exc).__name__)

# KEYS: buffer, since. After a drain: the buffer's age restarts, or ends with the buffer.
_RESINCE = _BUFFER_LUA + """
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[2]) return 0 end
redis.call('SET', KEYS[2], tostring(time_ms(redis.call('TIME'))))
return 1
"""


class Coalescer:
    """The drainer: a daemon thread in each worker; its lease lets one of them drain at a time."""

    def __init__(self, settings: Settings, app: Any) -> None:
        self.settings = settings
        self.app = app
        self.buffer = Fallback(settings, app, buffer="coalesce")
        self.limiter = Limiter(settings)
        self._since = key(settings, "coalesce", "since")
        self._in_flight = in_flight_key(settings)
        self.token = secrets.token_hex(8)
        self.tick_interval = max(0.005, min(0.02, settings.batch_linger / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.drained = 0
        self.batches = 0

    def tick(self) -> int:
        """One round: hold the lease, drain one batch's worth when it is due; returns how many."""
        s = self.settings
        lease = max(1.0, 20 * self.tick_interval)
        if not self.buffer.acquire_lease(self.token, lease):
            return -1
        started = time.monotonic()
        # One script, not a pipeline: TIME names no key, which a cluster store cannot route.
        n, since, now_ms, flying = run_script(s, _PEEK, [self.buffer._list, self._since, self._in_flight], [])
        if not n:
            return 0
        # At most batch_max_in_flight batches at once: the other worker processes stay free for
        # sends and single operations, and the buffer grows meanwhile (bigger batches, fewer
        # requests).
        if s.batch_max_in_flight and int(flying) >= s.batch_max_in_flight:
            return 0
        age = (int(now_ms) - int(since or 0)) / 1000.0
        if int(n) < s.batch_min_size and age < s.batch_linger:
            return 0
        # Pace by the limiter: a batch leaves when a slot is free now. Under heavier load the
        # buffer grows meanwhile and the next batch is bigger.
        if int(n) < s.batch_max_operations:
            call = self.limiter.acquire_call("track", late=2)
            if call is not None:
                granted = int(run_script(s, call.text, call.keys, call.args)[0])
                if not granted:
                    return 0
        capped = bool(s.batch_max_in_flight)
        done = self.buffer.release(s.batch_max_operations, batch=True, counted=capped,
                                   max_batches=s.batch_max_in_flight - int(flying) if capped else None,
                                   deadline=started + lease / 2)
        run_script(s, _RESINCE, [self.buffer._list, self._since], [])
        self.drained += done
        self.batches += 1 if done else 0
        return done

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                held = self.tick()
            except Exception as exc:  # noqa: BLE001 - the store may be down; try again later
                logger.warning("cio_celery batching drainer: %s", type(exc).__name__)
                held = -1
            # Not the lease holder (or failing): look again in a second, not every tick.
            self._stop.wait(1.0 if held < 0 else self.tick_interval)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="cio-batching-drainer", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.buffer.drop_lease(self.token)
        except Exception:  # noqa: BLE001, S110 - best effort: the lease expires anyway
            pass
