"""The delayed fallback store: operations parked in Redis while the breaker refuses calls.

Parking keeps an outage out of worker memory (no ETA messages held for its length) and
out of the retry budget. One releaser at a time (a Redis lease) moves parked operations
to the ``cio.fallback`` queue, oldest first, at a bounded rate, once the breaker allows.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any

from .breaker import Breaker
from .exceptions import ValidationError
from .meta import META_KEY, internal_publish
from .quarantine import Quarantine
from .settings import Settings
from .store import READ_COUNT_LUA, ScriptCall, count_of, key, redis_for, run_script
from .validation import OPERATIONS

__all__ = ["Fallback", "Releaser", "check_entry", "read_entry"]

logger = logging.getLogger("cio_celery.fallback")

# Renew the lease only if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0
"""
# KEYS: list, byte count. ARGV: max bytes (0: no cap), entries. All or none: entries that would
# pass the cap are refused with a FALLBACKFULL error (the caller keeps them and tries later).
_PARK = READ_COUNT_LUA + """
local max = tonumber(ARGV[1])
local depth = redis.call('LLEN', KEYS[1])
if #ARGV == 1 then return depth end
local bytes = read_count(KEYS[2])
if depth == 0 then bytes = 0 end
local add = 0
for i = 2, #ARGV do add = add + #ARGV[i] end
if max > 0 and depth > 0 and bytes + add > max then
  redis.call('SET', KEYS[2], tostring(bytes))
  return redis.error_reply('FALLBACKFULL the fallback store is full')
end
redis.call('SET', KEYS[2], tostring(bytes + add))
return redis.call('RPUSH', KEYS[1], unpack(ARGV, 2))
"""

# KEYS: list, trim count. ARGV: how many. The head of the list and how many trims it has had,
# read together: a release trims only if no other trim came between (see _TRIM).
_HEAD = READ_COUNT_LUA + """
return {redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1), read_count(KEYS[2])}
"""

# KEYS: list, byte count, trim count. ARGV: how many to trim from the head, their bytes, the head
# entry as it was read, the trim count as it was read. Trims only if no trim came between the
# read and now (and the head is the one read, for a releaser of an older version, which does
# not count its trims); else answers -1 and trims nothing. Two releasers can read the same head
# (a lease that ran out during a slow publish, or `cio fallback release` beside a worker):
# trimming by count, the second trim removed entries that nobody had published. The head alone
# is not enough: an entry parked again after its release can be the same bytes as the one read.
# Entries left in place are published again by the next release, and their claims make each
# copy one delivery.
_TRIM = READ_COUNT_LUA + """
local n = tonumber(ARGV[1])
if read_count(KEYS[3]) ~= tonumber(ARGV[4]) or redis.call('LINDEX', KEYS[1], 0) ~= ARGV[3] then
  return -1
end
redis.call('LTRIM', KEYS[1], n, -1)
redis.call('SET', KEYS[3], tostring(tonumber(ARGV[4]) + 1))
-- A damaged count reads 0 and is overwritten (DECRBY failed on it, after the LTRIM had run).
local left = read_count(KEYS[2]) - tonumber(ARGV[2])
if left < 0 or redis.call('LLEN', KEYS[1]) == 0 then left = 0 end
redis.call('SET', KEYS[2], tostring(left))
return n
"""


_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def read_entry(raw: Any) -> tuple[dict[str, Any] | None, str]:
    """A parked entry from its stored form, or (None, why it cannot be read)."""
    try:
        entry = json.loads(raw)
    except (ValueError, TypeError):
        return None, "not JSON"
    why = check_entry(entry)
    return (None, why) if why else (entry, "")


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


def check_entry(entry: Any) -> str:
    """Why a parked entry (decoded) cannot be used; '' when it can."""
    if not isinstance(entry, dict):
        return "not an object"
    if entry.get("operation") not in OPERATIONS:
        return "unknown operation"
    if not isinstance(entry.get("task_id"), str) or not entry["task_id"]:
        return "no task id"
    if not isinstance(entry.get("args"), list) or not isinstance(entry.get("kwargs"), dict):
        return "args or kwargs malformed"
    return ""


class Fallback:
    """Park, count and release operations (FIFO) for one settings' store.

    ``buffer="coalesce"`` is the adaptive-batching buffer (see coalesce.py): the same list
    operations, released to the fallback queue too, and an operation released alone from it is marked
    so that it is not coalesced into a batch again.
    """

    def __init__(self, settings: Settings, app: Any = None, buffer: str = "fallback") -> None:
        self.settings = settings
        self.app = app
        self.buffer = buffer
        if buffer == "coalesce":
            self._list = key(settings, "coalesce")
            self._lock = key(settings, "coalesce", "drainer")
            # Not behind the backlog of the main queue: workers fetch from their queues in turn.
            self.queue = settings.fallback_queue
            # Bounded by the admission (COALESCE_MAX entries, batch_buffer_max_bytes bytes).
            self.max_bytes = 0
        else:
            self._list = key(settings, "fallback", "ops")
            self._lock = key(settings, "fallback", "releaser")
            self.queue = settings.fallback_queue
            self.max_bytes = settings.fallback_max_bytes
        self._bytes = f"{self._list}:bytes"
        self._trims = f"{self._list}:trims"

    @property
    def _redis(self) -> Any:
        return redis_for(self.settings)

    def park(self, operation: str, task_id: str, args: list[Any], kwargs: dict[str, Any]) -> int:
        """Append one operation (with its metadata in kwargs); returns the new depth."""
        return self.park_many([{"operation": operation, "task_id": task_id, "args": args, "kwargs": kwargs}])

    def park_many(self, entries: list[dict[str, Any]]) -> int:
        """Append entries in one command (all or none); returns the new depth."""
        call = self.park_call(entries)
        return int(run_script(self.settings, call.text, call.keys, call.args))

    def park_call(self, entries: list[dict[str, Any]]) -> ScriptCall:
        """The script appending ``entries`` (to run with others in one round trip)."""
        return ScriptCall(_PARK, [self._list, self._bytes],
                          [self.max_bytes, *(json.dumps(e, separators=(",", ":")) for e in entries)])

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held now (bytes against ``fallback_max_bytes``)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.llen(self._list)
        pipe.get(self._bytes)
        depth, used = pipe.execute()
        return int(depth), count_of(used)

    def depth(self) -> int:
        return int(self._redis.llen(self._list))

    def release(self, limit: int, *, batch: bool = False, counted: bool = False,
                max_batches: int | None = None, deadline: float | None = None) -> int:
        """Publish up to ``limit`` of the oldest parked operations to the fallback queue.

        With ``batch``, Track-API operations go in ``cio_celery.deliver_batch`` tasks of up to
        500 KB / ``batch_max_operations`` each (see batching.py); the others one by one. An
        entry that cannot be read goes to the quarantine, one that no longer validates to dead
        letters, so that neither stops the ones behind it. Entries are removed (a prefix of the
        list) only once handled, and only if no other release trimmed the list since this one
        read it (another releaser may have read and removed the same head meanwhile: this one
        then removes nothing); a crash in between, or that race, publishes them twice, which the
        idempotency claim turns into one delivery. Returns how many were removed. ``deadline``
        (``time.monotonic()``): publish nothing more after it (the caller's lease is half gone);
        what was handled is removed, the rest waits for the next release. ``counted``: each batch
        counts against ``batch_max_in_flight`` from before its publish (and no longer if the
        publish fails); the batch task ends the count (see :func:`cio_celery.coalesce.batch_landed`).
        ``max_batches``: publish at most that many batches of the batching buffer (its groups are
        in order, so the rest stays a suffix of the list).
        """
        if limit <= 0:
            return 0
        if self.app is None:
            raise RuntimeError("Fallback needs the Celery app to release")
        raws, trims = run_script(self.settings, _HEAD, [self._list, self._trims], [limit])
        handled = [False] * len(raws)
        entries: list[tuple[int, dict[str, Any]]] = []
        quarantine = Quarantine(self.settings)
        try:
            for i, raw in enumerate(raws):
                entry, why = read_entry(raw)
                if entry is None:
                    quarantine.add("fallback", bytes(raw), why)
                    logger.error("cio_celery fallback entry quarantined: %s", why,
                                 extra={"cio_event": "quarantined", "cio_source": "fallback", "cio_why": why})
                    handled[i] = True
                else:
                    entries.append((i, entry))
            if batch:
                from .batching import BATCH_TASK, pack, pack_raw
                from .coalesce import batch_landed, batch_publishing

                if self.buffer == "coalesce":
                    # Only batchable operations enter this buffer: group them by their stored size
                    # (an upper bound of their v2 form) without converting them here; the batch
                    # task converts each once, and sends alone the few that cannot join.
                    packed = pack_raw([(e, len(raws[i])) for i, e in entries],
                                      max_items=self.settings.batch_max_operations)
                else:
                    packed = pack([e for _i, e in entries], max_items=self.settings.batch_max_operations)
                index_of = {id(e): i for i, e in entries}
                groups = packed.batches
                if max_batches is not None and not packed.singles:
                    groups = groups[:max(0, max_batches)]
                for group in groups:
                    if _past(deadline):
                        break
                    task_id = str(uuid.uuid4())
                    if counted:
                        batch_publishing(self.settings, task_id)
                    try:
                        with internal_publish():
                            self.app.tasks[BATCH_TASK].apply_async(args=[group], queue=self.queue,
                                                                   task_id=task_id)
                    except BaseException:
                        if counted:
                            batch_landed(self.settings, task_id)  # not in flight: never published
                        raise
                    for e in group:
                        handled[index_of[id(e)]] = True
                for e in packed.singles:
                    if _past(deadline):
                        break
                    self._publish_or_dead_letter(e)
                    handled[index_of[id(e)]] = True
            else:
                for i, e in entries:
                    if _past(deadline):
                        break
                    self._publish_or_dead_letter(e)
                    handled[i] = True
        finally:
            done = handled.index(False) if False in handled else len(handled)
            if done:
                trimmed = int(run_script(self.settings, _TRIM, [self._list, self._bytes, self._trims],
                                         [done, sum(len(raw) for raw in raws[:done]), raws[0], trims]))
                if trimmed < 0:
                    logger.warning("cio_celery %s: another releaser trimmed the list while this one published "
                                   "%d entries; they stay and are published again (with idempotency on, "
                                   "each is delivered once)", self.buffer, done,
                                   extra={"cio_event": "release_overlapped", "cio_count": done})
                    done = 0
        return done

    def _publish_or_dead_letter(self, entry: dict[str, Any]) -> None:
        try:
            self.publish(entry)
        except ValidationError as exc:
            # Parked by an older version whose checks it passed: kept for a human, not retried.
            from .deadletters import DeadLetters

            DeadLetters(self.settings, self.app).add(
                operation=entry["operation"], task_id=entry["task_id"], reason=f"invalid:{exc.field}",
                status=None, attempts=1, args=entry["args"], kwargs=entry["kwargs"])

    def publish(self, entry: dict[str, Any]) -> None:
        """Publish one parked entry to its queue as its own task."""
        task = self.app.tasks[f"cio_celery.{entry['operation']}"]
        kwargs = entry["kwargs"]
        if self.buffer == "coalesce":
            # It could not join a batch (too big, no v2 form): it must not be coalesced again.
            kwargs = {**kwargs, META_KEY: {**(kwargs.get(META_KEY) or {}), "alone": 1}}
        with internal_publish():
            task.apply_async(entry["args"], kwargs, task_id=entry["task_id"], queue=self.queue)

    def acquire_lease(self, token: str, ttl: float) -> bool:
        return bool(run_script(self.settings, _RENEW, [self._lock], [token, int(ttl * 1000)]))

    def drop_lease(self, token: str) -> None:
        run_script(self.settings, _RELEASE_LOCK, [self._lock], [token])

    def release_allowed(self, breaker: Breaker | None) -> tuple[int, bool]:
        """How many to release now, and whether in batches: the rate when closed (batches when
        ``batch_drain`` is on), K single probes when due, none while open. One breaker read."""
        s = self.settings
        per_tick = max(1, int(s.fallback_release_rate * s.fallback_release_interval))
        status = breaker.status() if breaker is not None else None
        if status is None or status.state == "closed":
            # Batches carry many operations per request: release enough to fill several.
            if s.batch_drain:
                return max(per_tick, 10 * s.batch_max_operations), True
            return per_tick, False
        if status.state == "half-open" or (status.state == "open" and status.time_left == 0):
            return max(0, s.breaker_half_open_probes - status.probes_in_flight), False
        return 0, False


# Seconds between two removals of the dead letters past their retention (by whichever worker's
# releaser holds the lease).
DEAD_LETTER_EXPIRY_INTERVAL = 60.0


class Releaser:
    """A daemon thread in each worker; the Redis lease lets one of them release at a time."""

    def __init__(self, fallback: Fallback, breaker: Breaker | None) -> None:
        self.fallback = fallback
        self.breaker = breaker
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.released = 0
        self.swept = 0
        self.expired = 0
        self._next_sweep = 0.0
        self._next_expiry = 0.0

    def tick(self) -> int:
        """One round: hold the lease, sweep the ledger when due, release what the breaker
        allows; returns how many were released."""
        interval = self.fallback.settings.fallback_release_interval
        lease = max(3 * interval, 5.0)
        if not self.fallback.acquire_lease(self.token, lease):
            return 0
        started = time.monotonic()
        for step, event in ((self._sweep, "ledger_sweep_failed"),
                            (self._expire_dead_letters, "dead_letter_expiry_failed")):
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - damaged or away: the release goes on
                logger.warning("cio_celery %s: %s", event, type(exc).__name__,
                               extra={"cio_event": event, "cio_error": type(exc).__name__})
        if self.fallback.depth() == 0:
            return 0
        allowed, batch = self.fallback.release_allowed(self.breaker)
        # Publish while the lease surely holds (it is not renewed during a release); the rest
        # goes next tick.
        n = self.fallback.release(allowed, batch=batch, deadline=started + lease / 2)
        self.released += n
        if n:
            logger.info("cio_celery fallback released %d operations", n,
                        extra={"cio_event": "fallback_released", "cio_count": n})
        return n

    def _sweep(self) -> None:
        """Look for operations lost in transit (see ledger.py), every quarter of the grace."""
        from .ledger import Ledger, ledger_enabled

        s, app = self.fallback.settings, self.fallback.app
        if app is None or not ledger_enabled(s, app) or time.monotonic() < self._next_sweep:
            return
        ledger = Ledger(s)
        self._next_sweep = time.monotonic() + max(1.0, ledger.grace / 4)
        self.swept += ledger.sweep(app)

    def _expire_dead_letters(self) -> None:
        """Remove the dead letters past their retention, once a minute (at most a few batches a
        time, so that one tick stays short; the rest go in the next minutes)."""
        from .deadletters import EXPIRE_BATCH, DeadLetters

        if time.monotonic() < self._next_expiry:
            return
        self._next_expiry = time.monotonic() + DEAD_LETTER_EXPIRY_INTERVAL
        dead = DeadLetters(self.fallback.settings, self.fallback.app)
        n = 0
        try:
            for _ in range(10):
                got = dead.expire(EXPIRE_BATCH)
                n += got
                if got < EXPIRE_BATCH:
                    break
        finally:
            self.expired += n
            if n:
                logger.info("cio_celery %d dead letters removed past their retention", n,
                            extra={"cio_event": "dead_letters_expired", "cio_count": n})

    def run(self) -> None:
        interval = self.fallback.settings.fallback_release_interval
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - the store may be down; try again next tick
                logger.warning("cio_celery fallback releaser: %s", type(exc).__name__)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self.run, name="cio-fallback-releaser", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.fallback.drop_lease(self.token)
        except Exception:  # noqa: BLE001, S110 - best effort: the lease expires anyway
            pass
