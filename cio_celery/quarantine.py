"""Store entries that cannot be read, kept aside so that they stop nothing.

A fallback entry or a dead letter that this version cannot read (bytes that are not JSON,
missing fields, an unknown operation) is moved here instead of blocking every parked
operation behind it or crashing a listing of dead letters. Each entry keeps the raw bytes
(which may hold customer data) with where it came from and why it could not be read; the
CLI lists entries without the raw bytes and purges them.

Keys: ``{prefix}:quarantine`` (hash: id -> JSON) and ``{prefix}:quarantine:index`` (sorted
set: id -> time moved). At most :data:`QUARANTINE_MAX` entries are kept, oldest dropped.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from .settings import Settings
from .store import READ_COUNT_LUA, key, redis_for, run_script

__all__ = ["QUARANTINE_MAX", "Quarantine", "Quarantined"]

QUARANTINE_MAX = 10_000

# KEYS: quarantine hash, quarantine index, source hash, source index, source byte count.
# ARGV: id, entry JSON, time, cap, source id ('': no source to remove it from).
# Moves atomically: the entry is in the quarantine before it leaves its source.
_ADD = READ_COUNT_LUA + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
if ARGV[5] ~= '' then
  local n = redis.call('HSTRLEN', KEYS[3], ARGV[5])
  if redis.call('HDEL', KEYS[3], ARGV[5]) == 1 and KEYS[5] ~= KEYS[1] then
    redis.call('SET', KEYS[5], tostring(math.max(0, read_count(KEYS[5]) - n)))
  end
  redis.call('ZREM', KEYS[4], ARGV[5])
end
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if over > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, over - 1)
  for _, id in ipairs(oldest) do
    redis.call('HDEL', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
return 1
"""


@dataclass(frozen=True)
class Quarantined:
    """One entry that could not be read; ``raw`` may hold customer data."""

    id: str
    source: str
    why: str
    moved_at: float
    size: int
    raw: bytes = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """The entry without its raw bytes (safe to print)."""
        return {"id": self.id, "source": self.source, "why": self.why, "moved_at": self.moved_at,
                "size": self.size}


class Quarantine:
    """The quarantine of one settings' store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._items = key(settings, "quarantine")
        self._index = key(settings, "quarantine", "index")

    def add(self, source: str, raw: bytes, why: str, source_keys: tuple[str, str] | None = None,
            source_id: str = "", source_bytes: str | None = None) -> str:
        """Keep ``raw``; with ``source_keys`` (a hash and its index), remove ``source_id`` from
        them in the same script. Returns the quarantine id."""
        digest = hashlib.sha256(raw).hexdigest()[:16]
        qid = f"{source}:{source_id or digest}"
        entry = {"id": qid, "source": source, "why": why[:200], "size": len(raw),
                 "raw_b64": base64.b64encode(raw).decode("ascii")}
        keys = [self._items, self._index, *(source_keys or (self._items, self._index)),
                source_bytes or self._items]
        run_script(self.settings, _ADD, keys,
                   [qid, json.dumps(entry, separators=(",", ":")), repr(time.time()), QUARANTINE_MAX,
                    source_id if source_keys else ""])
        return qid

    def count(self) -> int:
        return int(redis_for(self.settings).zcard(self._index))

    def entries(self, limit: int | None = 100) -> list[Quarantined]:
        """Entries oldest first."""
        client: Any = redis_for(self.settings)
        end = -1 if limit is None else limit - 1
        ids = client.zrange(self._index, 0, end, withscores=True)
        if not ids:
            return []
        raws = client.hmget(self._items, [i for i, _ in ids])
        out: list[Quarantined] = []
        for (qid, score), raw in zip(ids, raws, strict=True):
            if raw is not None:
                out.append(_decode(qid, raw, score))
        return out

    def get(self, qid: str) -> Quarantined | None:
        client: Any = redis_for(self.settings)
        raw = client.hget(self._items, qid)
        if raw is None:
            return None
        return _decode(qid.encode(), raw, client.zscore(self._index, qid) or 0.0)

    def purge(self, ids: list[str] | None = None) -> int:
        """Remove ``ids`` (all entries when None); returns how many were removed."""
        client: Any = redis_for(self.settings)
        if ids is None:
            ids = [i.decode() for i in client.zrange(self._index, 0, -1)]
        removed = 0
        for qid in ids:
            pipe = client.pipeline(transaction=True)
            pipe.hdel(self._items, qid)
            pipe.zrem(self._index, qid)
            n, _ = pipe.execute()
            removed += int(n)
        return removed


def _decode(qid: bytes, raw: bytes, score: float) -> Quarantined:
    name = qid.decode(errors="replace")
    try:
        d = json.loads(raw)
        data = base64.b64decode(d.get("raw_b64", ""))
        return Quarantined(id=name, source=str(d.get("source", "?")), why=str(d.get("why", "?")),
                           moved_at=float(score), size=len(data), raw=data)
    except (ValueError, TypeError, AttributeError):
        # The quarantine's own entry is damaged: show it as it is, never fail the listing.
        return Quarantined(id=name, source="?", why="unreadable quarantine entry", moved_at=float(score),
                           size=len(raw), raw=bytes(raw))
