"""The delivery ledger: the package's own record of every operation in flight.

Why: kombu's Redis transport takes a message with ``BRPOP`` and records it as unacknowledged in
a second command. A Redis restart between the two loses the message: it is in no queue, in no
unacknowledged hash, and no worker ever logged it as received (traced in the chaos suite, see
docs/chaos.md). The ledger closes that window end to end:

- every publish of an operation (enqueue, retry, release from the fallback, replay) records
  it: ``{prefix}:ledger`` (hash: task id -> the message) and ``{prefix}:ledger:due`` (sorted
  set: task id -> when to look at it). The record is handed to a background writer just before
  the publish and lands moments later (what has piled up goes in one pipelined
  round trip; the writer does not wait for more, which would widen this window); a batch
  message's record is written before its publish;
- the script that ends an operation (done mark, dead letter, park, a suppressed duplicate)
  removes it, in the same round trip;
- a sweeper (in the fallback releaser, so one at a time in the cluster) looks at entries
  overdue by ``grace`` seconds and republishes, with the same task id, those that are neither
  in their queue nor held unacknowledged by a worker. The idempotency claim makes a republish
  of an operation that was not lost harmless: it is suppressed.

A queue is first in, first out: an overdue entry published before the message at the head of
its queue cannot still be in that queue. Every message carries its publish time (``_cio.at``) so
the sweeper can tell. With a broker other than Redis the ledger is off (no such window).

On a Redis Cluster store the ledger's keys are in the store's common slot and the operation's
claim in its shard's slot, so a record is two steps: the operation's state is read (one pipelined
call per node for all the records written together), then the records of operations that have
not ended are written. An operation that ends between the two leaves an entry that the sweeper
republishes after the grace; its claim suppresses the copy, which clears the entry.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from ._process import PerProcess
from .idempotency import LOOKUP_LUA, Claims
from .meta import META_KEY
from .settings import Settings
from .store import ScriptCall, is_cluster, key, redis_for, run_pipelined, run_script

__all__ = ["Ledger", "RecordCall", "ledger_enabled", "write_records"]

logger = logging.getLogger("cio_celery.ledger")

# KEYS: the operation's claim, its done-mark index. ARGV: task id, member, path, prefix, shard.
# 1 when the operation ended: done, or dead-lettered by this very message. A record lands late by
# moments (it is written in the background), so only the two newest buckets of the done marks are
# looked in: an operation that ended earlier and is published again is recorded, and its entry
# goes when that copy is suppressed.
_ENDED_LUA = LOOKUP_LUA + """
local function ended(claim, index, task_id, member, path, prefix, shard)
  local v = redis.pcall('GET', claim)
  if type(v) == 'string' and (string.sub(v, 1, 2) == 'd:' or v == 'x:' .. task_id) then return true end
  return is_done(index, prefix, shard, member, path, now_ms(nil), 2)
end
"""
_ENDED = _ENDED_LUA + """
if ended(KEYS[1], KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]) then return 1 end
return 0
"""

# KEYS: entries, due. ARGV: task id, entry JSON, due (unix s).
_WRITE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: entries, due, the operation's claim, its done-mark index. ARGV: task id, entry JSON, due (unix s),
# member, path, prefix, shard. A record can land after the operation ended (it is written in
# the background): an operation that ended is not recorded.
_RECORD = _ENDED_LUA + """
if ended(KEYS[3], KEYS[4], ARGV[1], ARGV[4], tonumber(ARGV[5]), ARGV[6], ARGV[7]) then return 0 end
""" + _WRITE


@dataclass(frozen=True)
class RecordCall(ScriptCall):
    """A ledger record; on a cluster store, ``check`` reads whether the operation ended (in its
    shard's slot) and the call itself only writes (see the module docstring)."""

    check: ScriptCall | None = None


def write_records(settings: Settings, calls: list[ScriptCall]) -> None:
    """Write ledger records in one round trip (on a cluster, two: read the states, then write)."""
    checked = [c for c in calls if isinstance(c, RecordCall) and c.check is not None]
    plain = [c for c in calls if not (isinstance(c, RecordCall) and c.check is not None)]
    if checked:
        ended = run_pipelined(settings, [c.check for c in checked if c.check is not None])
        plain += [c for c, gone in zip(checked, ended, strict=True) if not int(gone or 0)]
    if plain:
        run_pipelined(settings, plain)

# KEYS: entries, due. ARGV: task ids.
_CLEAR = """
for i = 1, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
  redis.call('ZREM', KEYS[2], ARGV[i])
end
return #ARGV
"""

# KEYS: entries, due. ARGV: task id. The sweeper forgets the due time of an entry that ended,
# unless it was recorded again meanwhile (parked, then released): that one must stay swept.
_FORGET = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""

# A writer that cannot write says so at most this often.
_BACKOFF = 5.0


def ledger_enabled(settings: Settings, app: Any) -> bool:
    """On for a Redis broker (the only transport with the window), when a store is configured."""
    if not settings.ledger or not settings.redis_url or not settings.idempotency_enabled:
        return False
    url = str(getattr(app.conf, "broker_url", None) or "")
    return url.split(":", 1)[0] in {"redis", "rediss", "unix", "sentinel"}


def grace_of(settings: Settings) -> float:
    """How long an entry may go unseen before the sweeper looks for it: the visibility timeout
    (after which kombu itself restores an unacknowledged message), at most 5 minutes."""
    return settings.ledger_grace


class Ledger:
    """The ledger of one settings' store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._entries = key(settings, "ledger")
        self._due = key(settings, "ledger", "due")
        self.grace = grace_of(settings)

    def _write_args(self, task: str, task_id: str, args: Any, kwargs: Any, queue: str | None,
                    at: float) -> list[str]:
        """_WRITE's arguments: the task id, the entry (what the sweeper republishes), its due time."""
        entry = json.dumps({"task": task, "args": args, "kwargs": kwargs, "queue": queue, "at": at},
                           separators=(",", ":"))
        return [task_id, entry, repr(at + self.grace)]

    def record_call(self, task: str, task_id: str, args: Any, kwargs: Any, queue: str | None,
                    at: float) -> ScriptCall:
        written = self._write_args(task, task_id, args, kwargs, queue, at)
        meta = kwargs.get(META_KEY) if isinstance(kwargs, dict) else None
        operation = task.rsplit(".", 1)[-1]
        idem_key = meta.get("key") if isinstance(meta, dict) else None
        w = Claims(self.settings).where(operation, idem_key if isinstance(idem_key, str) else task_id)
        if is_cluster(self.settings):
            return RecordCall(_WRITE, [self._entries, self._due], written,
                              check=ScriptCall(_ENDED, [w.claim, w.index], [task_id, *w.lookup_args]))
        return RecordCall(_RECORD, [self._entries, self._due, w.claim, w.index], [*written, *w.lookup_args])

    def record(self, task: str, task_id: str, args: Any, kwargs: Any, queue: str | None, at: float) -> None:
        """Record one publish in the background (this process's writer); never raises, never waits.

        The writer sends what has piled up in one pipelined round trip; a store that cannot
        take it loses those records (logged), not the operations.
        """
        _writer_for(self.settings).put((self, task, task_id, args, kwargs, queue, at))

    def record_message_call(self, task: str, task_id: str, args: Any, kwargs: Any, queue: str | None,
                            at: float) -> ScriptCall:
        """The record of a message that carries operations but is not one (a batch): written
        before its publish, so it cannot land after the message ended; the message's task clears
        it when every operation in it has an outcome."""
        return ScriptCall(_WRITE, [self._entries, self._due], self._write_args(task, task_id, args, kwargs, queue, at))

    def record_now(self, calls: list[ScriptCall]) -> None:
        """Write records now, in one round trip (two on a cluster store): a batch message's."""
        if calls:
            write_records(self.settings, calls)

    def clear_call(self, task_ids: list[str]) -> ScriptCall:
        """Remove ended operations (run it in the round trip that ends them)."""
        return ScriptCall(_CLEAR, [self._entries, self._due], list(task_ids))

    def depth(self) -> int:
        return int(redis_for(self.settings).zcard(self._due))

    def sweep(self, app: Any, limit: int = 200) -> int:
        """Republish overdue entries that are in no queue and held by no worker; returns how many.

        An operation moves from its queue to the unacked hash (kombu) and ends by clearing its
        entry before its ack, so the reads go in that order: the heads of the queues, then the
        unacked hash, then the entries. An operation in its queue at the head read is seen
        there; one taken before it is seen held or has no entry left by the last read. Read the
        other way round, one that moved on between the reads looked lost.

        A retry or a release does not clear its entry but replaces it: an entry that changed
        between the first read (before the heads) and the last is looked at again a grace
        later. Not covered: a retry whose new entry (written in the background) lands after the
        last read, and a message requeued by kombu (``Reject(requeue=True)``), which keeps its
        publish time behind newer ones. Either may be republished while it waits; its claim
        suppresses the copy (a message more, never a send more).
        """
        client: Any = redis_for(self.settings)
        now = time.time()
        overdue = [t.decode() for t in client.zrangebyscore(self._due, "-inf", now, start=0, num=limit)]
        if not overdue:
            return 0
        queues = set(self.settings.queues)
        first = client.hmget(self._entries, overdue)
        for raw in first:
            queue = _queue_of(raw)
            if queue:
                queues.add(queue)
        with app.connection_for_read() as conn:
            broker = conn.default_channel.client
            heads = {queue: _head_time(broker.lindex(queue, -1)) for queue in sorted(queues)}
            unacked = b"".join(broker.hvals("unacked") or [])
            raws = client.hmget(self._entries, overdue)
            republished = 0
            for task_id, was, raw in zip(overdue, first, raws, strict=True):
                if raw is None:  # ended meanwhile
                    run_script(self.settings, _FORGET, [self._entries, self._due], [task_id])
                    continue
                if raw != was:  # retried or released between the reads: it has moved on
                    client.zadd(self._due, {task_id: now + self.grace})
                    continue
                try:
                    entry = json.loads(raw)
                    queue = str(entry.get("queue") or self.settings.queue)
                    at = float(entry["at"])
                except (ValueError, TypeError, KeyError):
                    client.hdel(self._entries, task_id)
                    client.zrem(self._due, task_id)
                    continue
                if task_id.encode() in unacked:
                    client.zadd(self._due, {task_id: now + self.grace})  # a worker holds it
                    continue
                if queue not in heads:
                    # Recorded after the heads were read: look again at the next sweep.
                    client.zadd(self._due, {task_id: now + self.grace})
                    continue
                head = heads[queue]
                if head is not None and head <= at:
                    # Published after the message at the head of its queue: it may be waiting.
                    client.zadd(self._due, {task_id: now + self.grace})
                    continue
                self._republish(app, task_id, entry)
                republished += 1
        if republished:
            logger.warning("cio_celery ledger republished %d operations lost in transit", republished,
                           extra={"cio_event": "ledger_republished", "cio_count": republished})
        return republished

    def _republish(self, app: Any, task_id: str, entry: dict[str, Any]) -> None:
        from .meta import internal_publish

        task = app.tasks.get(entry["task"])
        if task is None:
            return
        with internal_publish():
            task.apply_async(entry["args"], entry["kwargs"], task_id=task_id, queue=entry.get("queue"))


def _queue_of(raw: Any) -> str | None:
    """The queue an entry was published to (None: unreadable, or the default queue)."""
    if raw is None:
        return None
    try:
        queue = json.loads(raw).get("queue")
    except (ValueError, TypeError, AttributeError):
        return None
    return queue if isinstance(queue, str) and queue else None


def _head_time(raw: Any) -> float | None:
    """The publish time (``_cio.at``) of a kombu message as stored in a Redis list."""
    if raw is None:
        return None
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        _args, kwargs, _embed = json.loads(body)
        return float(kwargs[META_KEY]["at"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None  # not one of ours, or older than the ledger: cannot tell


class _Writer:
    """One background thread per process and store writing ledger records in pipelines."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # What to record, built into a script call by the writer (the caller only hands it over).
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="cio-ledger-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def put(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)

    def _take(self, first: tuple[Any, ...]) -> list[ScriptCall]:
        items = [first]
        while len(items) < 500:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        calls = []
        for ledger, *what in items:
            try:
                calls.append(ledger.record_call(*what))
            except Exception:  # noqa: BLE001, S112 - an entry that cannot be encoded is not recorded
                continue
        return calls

    def _write(self, calls: list[ScriptCall]) -> None:
        if not calls:
            return
        try:
            write_records(self.settings, calls)
        except Exception as exc:  # noqa: BLE001 - a safety net: the operations themselves are published
            if time.monotonic() - self._warned_at > _BACKOFF:
                self._warned_at = time.monotonic()
                logger.warning("cio_celery ledger: %d records not written (%s)", len(calls), type(exc).__name__,
                               extra={"cio_event": "ledger_unavailable", "cio_count": len(calls)})

    def _run(self) -> None:
        while True:
            self._write(self._take(self._queue.get()))

    def flush(self, timeout: float = 1.0) -> None:
        """Write what is queued now (at exit, and in tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                first = self._queue.get_nowait()
            except queue.Empty:
                return
            self._write(self._take(first))


_writers: PerProcess[_Writer] = PerProcess()


def _writer_for(settings: Settings) -> _Writer:
    return _writers.get(id(settings), lambda: _Writer(settings))
