"""The dead-letter store: every operation that will not be delivered, with its reason.

Entries live in one Redis hash (id -> JSON) indexed by a sorted set (id -> failed_at).
Adding trims by retention and by size cap in the same script, and every worker's releaser
thread removes the entries past their retention once a minute (:meth:`DeadLetters.expire`), so
the store stays bounded, and customer data is not kept past the retention, however long nobody
looks at it and whether or not new dead letters arrive. Entries hold the payload needed to replay
(customer data): it is kept in values only, never in key names.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from .meta import internal_publish
from .quarantine import Quarantine
from .settings import Settings
from .store import READ_COUNT_LUA, ScriptCall, count_of, key, redis_for, run_script

__all__ = ["DeadLetter", "DeadLetters", "is_full_error"]

# Removes at most ``limit`` entries older than ``cutoff`` (unix s), oldest first; answers the
# byte count left (not written back: the caller does) and how many were removed.
_EXPIRE_LUA = READ_COUNT_LUA + """
local function now_s()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
local function expire(items, index, bytes_key, cutoff, limit)
  local bytes = read_count(bytes_key)
  local expired = redis.call('ZRANGEBYSCORE', index, '-inf', cutoff, 'LIMIT', 0, limit)
  for _, id in ipairs(expired) do
    bytes = bytes - redis.call('HSTRLEN', items, id)
    redis.call('HDEL', items, id)
    redis.call('ZREM', index, id)
  end
  if bytes < 0 or redis.call('ZCARD', index) == 0 then bytes = 0 end
  return bytes, #expired
end
"""

# Most entries one script removes for their age (an add, or one call of the releaser's expiry).
EXPIRE_BATCH = 1000

# KEYS: items, index, bytes. ARGV: id, entry JSON, retention s, max count, max bytes.
# Entries past their retention go first (at most EXPIRE_BATCH); then a new entry that would
# pass either cap is refused with a DLQFULL error (nothing written, nothing dropped: the caller
# keeps the operation and tries later). The byte count follows every write and removal.
_ADD = _EXPIRE_LUA + f"""
local t = now_s()
local cutoff = t - tonumber(ARGV[3])
local bytes = expire(KEYS[1], KEYS[2], KEYS[3], cutoff, {EXPIRE_BATCH})
-- Entries past their retention that this add left for later do not count against the cap.
local count = redis.call('ZCOUNT', KEYS[2], string.format('(%.17g', cutoff), '+inf')
local existing = redis.call('HSTRLEN', KEYS[1], ARGV[1])
if existing == 0 and (count >= tonumber(ARGV[4]) or bytes + #ARGV[2] > tonumber(ARGV[5])) then
  redis.call('SET', KEYS[3], tostring(bytes))
  return redis.error_reply('DLQFULL dead letters are full')
end
-- The entry is stored as the caller encoded it; its time is the index score.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], t, ARGV[1])
redis.call('SET', KEYS[3], tostring(bytes + #ARGV[2] - existing))
return t
"""

# KEYS: items, index, bytes. ARGV: retention s, limit. Answers how many entries it removed.
_EXPIRE = _EXPIRE_LUA + """
local bytes, n = expire(KEYS[1], KEYS[2], KEYS[3], now_s() - tonumber(ARGV[1]), tonumber(ARGV[2]))
if n > 0 then redis.call('SET', KEYS[3], tostring(bytes)) end
return n
"""

# KEYS: items, index, bytes. ARGV: id.
_DELETE = READ_COUNT_LUA + """
local n = redis.call('HSTRLEN', KEYS[1], ARGV[1])
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if removed == 1 then
  local left = read_count(KEYS[3]) - n
  if left < 0 or redis.call('ZCARD', KEYS[2]) == 0 then left = 0 end
  redis.call('SET', KEYS[3], tostring(left))
end
return removed
"""


def is_full_error(exc: BaseException) -> bool:
    """A store answer saying a capped store (dead letters, the fallback) is full."""
    text = str(exc)
    return text.startswith(("DLQFULL", "FALLBACKFULL"))


@dataclass(frozen=True)
class DeadLetter:
    """One operation that was not delivered, and what is needed to replay it."""

    id: str
    operation: str
    task_id: str
    reason: str
    status: int | None
    attempts: int
    failed_at: float
    args: list[Any] = field(repr=False)
    kwargs: dict[str, Any] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The entry without its payload (safe to print)."""
        d = asdict(self)
        d.pop("args")
        d.pop("kwargs")
        return d


class DeadLetters:
    """List, replay and purge dead letters of one settings' store."""

    def __init__(self, settings: Settings, app: Any = None) -> None:
        self.settings = settings
        self.app = app
        self._items = key(settings, "dlq", "items")
        self._index = key(settings, "dlq", "index")
        self._bytes = key(settings, "dlq", "bytes")

    @property
    def _redis(self) -> Any:
        return redis_for(self.settings)

    def add(
        self,
        *,
        operation: str,
        task_id: str,
        reason: str,
        status: int | None,
        attempts: int,
        args: Iterable[Any],
        kwargs: dict[str, Any],
    ) -> str:
        call = self.add_call(operation=operation, task_id=task_id, reason=reason, status=status,
                             attempts=attempts, args=args, kwargs=kwargs)
        run_script(self.settings, call.text, call.keys, call.args)
        return task_id

    def add_call(
        self,
        *,
        operation: str,
        task_id: str,
        reason: str,
        status: int | None,
        attempts: int,
        args: Iterable[Any],
        kwargs: dict[str, Any],
    ) -> ScriptCall:
        """The script that adds one entry, to run with the claim's dead mark in one script."""
        entry = {
            "id": task_id,
            "operation": operation,
            "task_id": task_id,
            "reason": reason,
            "status": status,
            "attempts": attempts,
            "args": list(args),
            "kwargs": kwargs,
        }
        return ScriptCall(_ADD, [self._items, self._index, self._bytes], [
            task_id,
            json.dumps(entry, separators=(",", ":")),
            self.settings.dead_letter_retention,
            self.settings.dead_letter_max,
            self.settings.dead_letter_max_bytes,
        ])

    def count(self) -> int:
        return int(self._redis.zcard(self._index))

    def expire(self, limit: int = EXPIRE_BATCH) -> int:
        """Remove at most ``limit`` entries past ``dead_letter_retention`` (oldest first);
        returns how many. Worker releasers call it once a minute."""
        return int(run_script(self.settings, _EXPIRE, [self._items, self._index, self._bytes],
                              [self.settings.dead_letter_retention, limit]))

    def get(self, id: str) -> DeadLetter | None:
        """The entry ``id``; None when there is none, or when it cannot be read (it then moves
        to the quarantine)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._items, id)
        pipe.zscore(self._index, id)
        raw, score = pipe.execute()
        return None if raw is None else self._read(id, raw, score)

    def _read(self, id: str | bytes, raw: bytes, score: float | None) -> DeadLetter | None:
        try:
            return _decode(raw, score)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            name = id.decode(errors="replace") if isinstance(id, bytes) else id
            Quarantine(self.settings).add("dead_letter", bytes(raw), f"unreadable ({type(exc).__name__})",
                                          source_keys=(self._items, self._index), source_id=name,
                                          source_bytes=self._bytes)
            return None

    def _iter_ids(
        self, older_than: float | None, newer_than: float | None
    ) -> list[tuple[bytes, float]]:
        now = time.time()
        hi: float | str = "+inf" if older_than is None else now - older_than
        lo: float | str = "-inf" if newer_than is None else now - newer_than
        return list(self._redis.zrangebyscore(self._index, lo, hi, withscores=True))

    def iter(
        self,
        operation: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        reason: str | None = None,
    ) -> Iterator[DeadLetter]:
        """Entries oldest first; ``older_than``/``newer_than`` are ages in seconds, ``reason`` a
        prefix of the reason (``not_configured``, ``retries_exhausted``). An entry that cannot
        be read moves to the quarantine and is skipped."""
        ids = self._iter_ids(older_than, newer_than)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            raws = self._redis.hmget(self._items, [i for i, _ in chunk])
            for raw, (id, score) in zip(raws, chunk, strict=True):
                if raw is None:
                    continue
                entry = self._read(id, raw, score)
                if entry is None:
                    continue
                if operation is not None and entry.operation != operation:
                    continue
                if reason is not None and not entry.reason.startswith(reason):
                    continue
                yield entry

    def list(
        self,
        operation: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int | None = 100,
        reason: str | None = None,
    ) -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for entry in self.iter(operation, older_than, newer_than, reason):
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out

    def delete(self, id: str) -> bool:
        return bool(run_script(self.settings, _DELETE, [self._items, self._index, self._bytes], [id]))

    def usage(self) -> tuple[int, int]:
        """(entries, bytes) held now, against ``dead_letter_max`` and ``dead_letter_max_bytes``."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(self._index)
        pipe.get(self._bytes)
        count, used = pipe.execute()
        return int(count), count_of(used)

    def purge(
        self,
        operation: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        reason: str | None = None,
    ) -> int:
        ids = [e.id for e in self.iter(operation, older_than, newer_than, reason)]
        for id in ids:
            self.delete(id)
        return len(ids)

    def replay(
        self,
        ids: Iterable[str] | None = None,
        operation: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        reason: str | None = None,
    ) -> int:
        """Re-enqueue entries (same idempotency key and event id); each is removed once published.

        An entry that no longer validates raises ValidationError and stays where it is.
        """
        if self.app is None:
            raise RuntimeError("DeadLetters needs the Celery app to replay")
        if ids is not None:
            entries = [e for e in (self.get(i) for i in ids) if e is not None]
        else:
            entries = list(self.iter(operation, older_than, newer_than, reason))
        done = 0
        for entry in entries:
            task = self.app.tasks[f"cio_celery.{entry.operation}"]
            # A new task id: the claim's dead-letter mark stops only the dead-lettered message.
            with internal_publish():
                task.apply_async(entry.args, entry.kwargs)
            self.delete(entry.id)
            done += 1
        return done


def _decode(raw: bytes, failed_at: float | None) -> DeadLetter:
    d = json.loads(raw)
    return DeadLetter(
        id=d["id"],
        operation=d["operation"],
        task_id=d["task_id"],
        reason=d["reason"],
        status=d.get("status"),
        attempts=int(d.get("attempts", 0)),
        failed_at=float(failed_at or 0.0),
        args=list(d.get("args") or []),
        kwargs=dict(d.get("kwargs") or {}),
    )
