"""Idempotency claims: an operation reaches Customer.io once per idempotency key.

A worker claims the key with a lease holding its owner token before it calls Customer.io;
marks it done only after a success; and on any other outcome releases only its own claim
(compare-and-delete). A claim held by another worker means "try again later", never "drop";
a done key means the operation is skipped and counted as a suppressed duplicate.

Keys hold a hash of the operation and its key, never customer data. The key layout, per
operation (``<tag>`` is :func:`~cio_celery.store.shard_tag` of the operation's shard, one of
1,024 picked by the digest)::

    <tag>:idem:<sha256 hex>             the claim (string): c:<token> while claimed,
                                        x:<task id> once dead-lettered
    <tag>:idem:<sha256 hex>:attempt     the attempt marker (counter): attempts that never finished
    <tag>:idem:<W>.<R>:<b>:<shard>[:<level>:<index>]
                                        done marks: sets of 64-bit digests, one per bucket b of
                                        W ms and shard (and overflow level), expiring at
                                        (b + 1) x W + R ms
    <tag>:idem:index:<shard>            the shard's index (hash): "<W>.<R>" -> when that series'
                                        last set expires, "<W>.<R>:<b>" -> the levels bucket b uses
    <tag>:stats                         suppressed duplicates per operation (hash)

A done mark is 64 bits of the digest added to the set of its shard and time bucket. Redis keeps
a set of integers as an *intset*, 8 bytes a member, up to ``set-max-intset-entries`` (512 by
default): one expiry for hundreds of marks, instead of a key of about 229 bytes per mark. A full
set overflows into 16 sets at the next level, chosen by other bits of the digest, and so on; the
index says how many levels each bucket uses, so a lookup is one read of the index and one
``SISMEMBER`` per level of each live bucket. How long a mark lives depends on the kind of key
(docs/idempotency.md): a task id is kept for the redelivery horizon the settings allow
(:attr:`Settings.task_key_retention`), a caller key (``idempotency_key=``) for
``idempotency_retention``. Each (bucket width W, retention R) is a *series*, recorded in the
index: a lookup finds the marks of every series still alive, written under other settings too.

Beside each live claim the attempt marker counts the attempts that started and never finished:
the next claim reports them (``lost_attempts``), which tells a transactional send that its
previous attempt died mid-call and may have been applied, and stops an operation that kills its
worker every time from being redelivered for ever.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .settings import Settings
from .store import SHARDS, ScriptCall, is_cluster, redis_for, run_script, shard_tag

__all__ = ["LOOKUP_LUA", "SET_LIMIT", "Claim", "Claims", "Where", "bucket_ms"]

# The done marks (see the module docstring), shared by the scripts that read or write them.
# Keys are built here from the prefix of a key in KEYS: they carry its hash tag (same slot).
LOOKUP_LUA = """
-- Redis' clock in ms; tests pass their own (``Claims(clock=...)``), never production.
local function now_ms(override)
  if override and override ~= '' then return tonumber(override) end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function level_key(base, level, path)
  if level == 0 then return base end
  return base .. ':' .. level .. ':' .. string.format('%d', path % (16 ^ level))
end

-- The levels a bucket's marks use in a shard: '<first>:<depth>' (levels first .. depth - 1).
local function levels_of(v)
  if not v then return nil end
  local first, depth = string.match(v, '^(%d+):(%d+)$')
  if first then return tonumber(first), tonumber(depth) end
  return nil
end

-- The shard's index: '<W>.<R>' -> when the series' last bucket ends (ms), '<W>.<R>:<b>' -> the
-- levels bucket b uses in this shard. Returns the live series and the levels; drops the rest.
-- A damaged index is dropped whole (its marks are then not found: they may go again).
local function read_index(ikey, now)
  local raw = redis.pcall('HGETALL', ikey)
  local series, levels = {}, {}
  if type(raw) == 'table' and raw.err then
    redis.call('DEL', ikey)
    return series, levels
  end
  for i = 1, #raw, 2 do
    local f, v = raw[i], raw[i + 1]
    local w, r, b = string.match(f, '^(%d+)%.(%d+):(%d+)$')
    if w then
      local first, depth = levels_of(v)
      if first and (tonumber(b) + 1) * tonumber(w) + tonumber(r) > now then
        levels[f] = {first, depth}
      else
        redis.call('HDEL', ikey, f)
      end
    else
      w, r = string.match(f, '^(%d+)%.(%d+)$')
      if w and tonumber(v) and tonumber(v) > now and tonumber(w) > 0 then
        series[#series + 1] = {f, tonumber(w), tonumber(r)}
      else
        redis.call('HDEL', ikey, f)
      end
    end
  end
  return series, levels
end

-- ``span``: how many of the newest buckets of each series to look in (nil: all of them).
local function is_done(ikey, prefix, shard, member, path, now, span)
  local series, levels = read_index(ikey, now)
  for _, s in ipairs(series) do
    local last = math.floor(now / s[2])
    local first = math.max(math.floor((now - s[3]) / s[2]), last - (span or 65) + 1)
    for b = last, first, -1 do
      local bucket = s[1] .. ':' .. string.format('%d', b)
      local lv = levels[bucket]
      if lv then
        local base = prefix .. bucket .. ':' .. shard
        for level = lv[1], math.min(lv[2], 9) - 1 do
          local key = level_key(base, level, path)
          local r = redis.pcall('SISMEMBER', key, member)
          if r == 1 then return true end
          if type(r) == 'table' then redis.call('DEL', key) end
        end
      end
    end
  end
  return false
end

-- A bucket's first mark in a shard starts one level above the deepest the previous bucket used:
-- the levels it filled before that would be full again, and a lookup would read them for
-- nothing. (The deepest one holds only what overflowed: starting there would spread a bucket
-- over sets too many to fill.)
local function mark_done(ikey, prefix, shard, member, path, now, id, w, r, limit)
  local b = math.floor(now / w)
  local ends = (b + 1) * w + r
  local bucket = id .. ':' .. string.format('%d', b)
  local got = redis.pcall('HMGET', ikey, bucket, id, id .. ':' .. string.format('%d', b - 1))
  if type(got) == 'table' and got.err then
    redis.call('DEL', ikey)
    got = {}
  end
  local first, depth = levels_of(got[1])
  if not first then
    local _, before = levels_of(got[3])
    first = math.min(math.max((before or 0) - 2, 0), 4)
    depth = first
  end
  local base = prefix .. bucket .. ':' .. shard
  local level = first
  local key = level_key(base, level, path)
  while level < 8 do
    local n = redis.pcall('SCARD', key)
    if type(n) == 'table' then
      redis.call('DEL', key)
      n = 0
    end
    -- A set takes marks while it is an intset under the limit: a server configured with a lower
    -- set-max-intset-entries turns a set into a hashtable early, and its next marks go deeper.
    if n == 0 or (n < limit and redis.call('OBJECT', 'ENCODING', key) == 'intset') then
      redis.call('SADD', key, member)
      if n == 0 then redis.call('PEXPIREAT', key, string.format('%d', ends)) end
      break
    end
    if redis.call('SISMEMBER', key, member) == 1 then break end
    level = level + 1
    key = level_key(base, level, path)
  end
  if level == 8 then  -- 512 x 16^7 marks in one shard and bucket: never, but never lost either
    redis.call('SADD', key, member)
    redis.call('PEXPIREAT', key, string.format('%d', ends))
  end
  if level + 1 > depth then
    redis.call('HSET', ikey, bucket, string.format('%d:%d', first, level + 1))
  end
  if (tonumber(got[2] or '') or 0) < ends then
    redis.call('HSET', ikey, id, string.format('%d', ends))
    local ttl = redis.call('PTTL', ikey)
    if ttl < 0 or now + ttl < ends then redis.call('PEXPIREAT', ikey, string.format('%d', ends)) end
  end
end
"""

# KEYS: claim, attempt marker, stats hash, index.
# ARGV: token, lease ms, attempt marker retention ms, operation, task id, member, path, prefix, shard,
# clock override.
_CLAIM = LOOKUP_LUA + """
local token, lease, keep, operation, task_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local member, path, prefix, shard = ARGV[6], tonumber(ARGV[7]), ARGV[8], ARGV[9]
local claim, marker, stats, index = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local function suppressed()
  redis.call('HINCRBY', stats, 'suppressed:' .. operation, 1)
  return {'done', 0}
end
local v = redis.pcall('GET', claim)
if type(v) == 'table' then
  -- A key of another type, that no claim can be read from: replaced.
  redis.call('DEL', claim)
  v = false
end
if v then
  local kind = string.sub(v, 1, 2)
  -- A done mark written by a version that kept them in the claim key.
  if kind == 'd:' then return suppressed() end
  -- Dead-lettered: a redelivered copy of that message stops; another message with the same
  -- key (the caller enqueued it again, fixed) is a new attempt.
  if kind == 'x:' and string.sub(v, 3) == task_id then return {'dead', 0} end
  if kind ~= 'x:' then
    local left = redis.call('PTTL', claim)
    if left < 0 then
      -- A claim that would never end (written without a lease): give it one, so that it ends.
      redis.call('PEXPIRE', claim, lease)
      left = tonumber(lease)
    end
    return {'held', left}
  end
end
if is_done(index, prefix, shard, member, path, now_ms(ARGV[10])) then return suppressed() end
redis.call('SET', claim, 'c:' .. token, 'PX', lease)
local n = redis.pcall('INCR', marker)
if type(n) == 'table' then
  redis.call('DEL', marker)  -- a marker that cannot be counted starts again
  n = redis.call('INCR', marker)
end
redis.call('PEXPIRE', marker, keep)
return {'claimed', n - 1}
"""

# KEYS: claim, attempt marker, index.
# ARGV: token, member, path, prefix, shard, set limit, then the series of the claim's kind (id,
# bucket ms, retention ms), then the caller-key series (used when the claim is no longer ours),
# clock override.
# Marked done whoever holds the lease now: the operation was applied.
_DONE = LOOKUP_LUA + """
local token, member, path, prefix, shard, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5],
  tonumber(ARGV[6])
local claim, marker, index = KEYS[1], KEYS[2], KEYS[3]
local v = redis.pcall('GET', claim)
local ours = v == 'c:' .. token
local id, w, r = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
if not ours then id, w, r = ARGV[10], tonumber(ARGV[11]), tonumber(ARGV[12]) end
mark_done(index, prefix, shard, member, path, now_ms(ARGV[13]), id, w, r, limit)
redis.call('DEL', claim, marker)
if ours then return 1 end
return 0
"""

# KEYS: claim, attempt marker. ARGV: token, retention ms, task id.
# Written in the same script as the dead letter (after it, on a cluster): a redelivered copy
# of a dead-lettered operation finds it and stops, instead of calling again.
_DEAD = """
if redis.pcall('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'x:' .. ARGV[3], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS: claim, attempt marker. ARGV: token. Only the owner's claim goes.
_RELEASE = """
if redis.pcall('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

# KEYS: claim, index. ARGV: member, path, prefix, shard, clock override.
_STATE = LOOKUP_LUA + """
local v = redis.pcall('GET', KEYS[1])
if type(v) == 'string' then
  local kind = string.sub(v, 1, 2)
  if kind == 'x:' then return 'dead' end
  if kind == 'd:' then return 'done' end
  return 'claimed'
end
if is_done(KEYS[2], ARGV[3], ARGV[4], ARGV[1], tonumber(ARGV[2]), now_ms(ARGV[5])) then return 'done' end
return ''
"""

# KEYS: claim, attempt marker. ARGV: token. The owner's claim goes, and this attempt is taken
# back from the marker: it ended without a call (a batch item sent on alone), so it is not lost.
_RELEASE_UNTRIED = """
if redis.pcall('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  local n = tonumber(redis.pcall('GET', KEYS[2]) or '')
  if n and n > 0 then redis.call('DECR', KEYS[2]) end
  return 1
end
return 0
"""

State = Literal["claimed", "done", "held", "dead"]

# The first character of a claim token: the kind of its key, which sets its done mark's life.
_TASK_KIND, _CALLER_KIND = "t", "c"

# Marks one set holds: Redis' default set-max-intset-entries, up to which a set of integers is an
# intset (8 bytes a member). A set a server turned into a hashtable earlier takes no more marks.
SET_LIMIT = 512


def bucket_ms(retention_ms: int) -> int:
    """The bucket width of a series: a power of two milliseconds, at least a quarter of the
    retention (so a lookup reads at most 5 buckets), at least 1,024 ms."""
    return max(1024, 1 << max(0, math.ceil(math.log2(max(1, retention_ms) / 4))))


@dataclass(frozen=True)
class Where:
    """Where one idempotency key's state lives: its keys and the digest bits its marks use."""

    claim: str
    attempt: str
    index: str
    stats: str
    prefix: str  # of the done-mark sets: "<tag>:idem:"
    shard: int
    member: str  # 64 bits of the digest, as a signed decimal (an intset member)
    path: int  # 32 other bits: the set at each overflow level

    @property
    def lookup_args(self) -> list[Any]:
        return [self.member, self.path, self.prefix, self.shard]


def _where(claim_key: str) -> Where:
    tag, _, hexdigest = claim_key.rpartition(":idem:")
    digest = bytes.fromhex(hexdigest)
    shard = int.from_bytes(digest[8:10], "big") % SHARDS
    return Where(
        claim=claim_key, attempt=f"{claim_key}:attempt", index=f"{tag}:idem:index:{shard}", stats=f"{tag}:stats",
        prefix=f"{tag}:idem:", shard=shard, member=str(int.from_bytes(digest[:8], "big", signed=True)),
        path=int.from_bytes(digest[10:14], "big"),
    )


@dataclass(frozen=True)
class Claim:
    """The answer of a claim: ``claimed`` (ours to deliver), ``done``, ``held`` (by another) or
    ``dead`` (the operation is in dead letters)."""

    state: State
    keys: tuple[str, str]
    token: str
    held_for: float = 0.0  # seconds left on another worker's lease
    lost_attempts: int = 0  # earlier attempts that started and never finished

    @property
    def recovered(self) -> bool:
        """An earlier attempt died mid-call (worker killed, hard time limit): it may have been applied."""
        return self.lost_attempts > 0

    @property
    def owned(self) -> bool:
        return self.state == "claimed"


class Claims:
    """The claims of one settings' store; ``clock`` (unix seconds) replaces Redis' ``TIME`` for
    the done marks, in tests only."""

    def __init__(self, settings: Settings, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self._clock = clock
        self._task_ms = int(settings.task_key_retention * 1000)
        self._caller_ms = int(settings.caller_key_retention * 1000)

    # -- key layout ----------------------------------------------------------------------

    def where(self, operation: str, idempotency_key: str) -> Where:
        digest = hashlib.sha256(f"{operation}\x00{idempotency_key}".encode()).digest()
        shard = int.from_bytes(digest[8:10], "big") % SHARDS
        return _where(f"{shard_tag(self.settings, shard)}:idem:{digest.hex()}")

    def keys_for(self, operation: str, idempotency_key: str) -> tuple[str, str]:
        """The claim and its attempt marker."""
        w = self.where(operation, idempotency_key)
        return w.claim, w.attempt

    def _series(self, kind: str) -> list[Any]:
        ms = self._task_ms if kind == _TASK_KIND else self._caller_ms
        width = bucket_ms(ms)
        return [f"{width}.{ms}", width, ms]

    def _now_arg(self) -> str:
        return "" if self._clock is None else str(int(self._clock() * 1000))

    def _retention_ms(self, token: str) -> int:
        return self._task_ms if token[:1] == _TASK_KIND else self._caller_ms

    # -- the protocol ----------------------------------------------------------------------

    def claim_call(self, operation: str, idempotency_key: str, task_id: str = "") -> tuple[
            ScriptCall, tuple[str, str], str]:
        """The claim script; a key equal to the task id is a task-id key (its done mark lives the
        redelivery horizon), any other a caller key (``idempotency_retention``)."""
        w = self.where(operation, idempotency_key)
        kind = _TASK_KIND if task_id and idempotency_key == task_id else _CALLER_KIND
        token = kind + secrets.token_hex(8)
        args = [token, int(self.settings.claim_lease * 1000), self._retention_ms(token), operation, task_id,
                *w.lookup_args, self._now_arg()]
        return ScriptCall(_CLAIM, [w.claim, w.attempt, w.stats, w.index], args), (w.claim, w.attempt), token

    @staticmethod
    def claim_result(res: Any, keys: tuple[str, str], token: str) -> Claim:
        state = res[0].decode() if isinstance(res[0], bytes) else str(res[0])
        value = int(res[1])
        if state == "claimed":
            return Claim("claimed", keys, token, lost_attempts=value)
        if state in ("done", "dead"):
            return Claim(state, keys, token)  # type: ignore[arg-type]
        return Claim("held", keys, token, held_for=max(0.0, value / 1000.0))

    def claim(self, operation: str, idempotency_key: str, task_id: str = "") -> Claim:
        call, keys, token = self.claim_call(operation, idempotency_key, task_id)
        return self.claim_result(run_script(self.settings, call.text, call.keys, call.args), keys, token)

    def done_call(self, claim: Claim, task_id: str) -> ScriptCall:
        w = _where(claim.keys[0])
        kind = _TASK_KIND if claim.token[:1] == _TASK_KIND else _CALLER_KIND
        args = [claim.token, w.member, w.path, w.prefix, w.shard, SET_LIMIT,
                *self._series(kind), *self._series(_CALLER_KIND), self._now_arg()]
        return ScriptCall(_DONE, [w.claim, w.attempt, w.index], args)

    def dead_call(self, claim: Claim, task_id: str) -> ScriptCall:
        """Mark our claim dead-lettered (run it with the dead letter's own script: on a cluster it
        runs after the dead letter was written, see docs/cluster.md)."""
        return ScriptCall(_DEAD, list(claim.keys), [claim.token, self._retention_ms(claim.token), task_id],
                          after_others=True)

    def release_call(self, claim: Claim, *, untried: bool = False) -> ScriptCall:
        """Release our claim; ``untried``: the attempt ended without a call, so the attempt marker
        keeps counting only the earlier attempts that never finished (instead of being cleared)."""
        return ScriptCall(_RELEASE_UNTRIED if untried else _RELEASE, list(claim.keys), [claim.token])

    def done(self, claim: Claim, task_id: str) -> bool:
        """Mark delivered; False when our lease had run out first (another worker may be calling)."""
        call = self.done_call(claim, task_id)
        return bool(run_script(self.settings, call.text, call.keys, call.args))

    def release(self, claim: Claim) -> bool:
        call = self.release_call(claim)
        return bool(run_script(self.settings, call.text, call.keys, call.args))

    def state_call(self, operation: str, idempotency_key: str) -> ScriptCall:
        """The script reading a key's state: ``done``, ``dead``, ``claimed`` or an empty answer."""
        w = self.where(operation, idempotency_key)
        return ScriptCall(_STATE, [w.claim, w.index], [*w.lookup_args, self._now_arg()])

    @staticmethod
    def state_result(res: Any) -> str | None:
        state = res.decode() if isinstance(res, bytes) else str(res or "")
        return state or None

    def state_of(self, operation: str, idempotency_key: str) -> str | None:
        """``done``, ``dead``, ``claimed`` or None: for tests, the CLI and the health view."""
        call = self.state_call(operation, idempotency_key)
        return self.state_result(run_script(self.settings, call.text, call.keys, call.args))

    def suppressed(self) -> dict[str, int]:
        """Suppressed duplicates per operation since the stats were last reset (on a cluster,
        the sum over the shards' counters: one pipelined read per node)."""
        if is_cluster(self.settings):
            tags = sorted({shard_tag(self.settings, n) for n in range(SHARDS)})
            pipe: Any = redis_for(self.settings).pipeline(transaction=False)
            for tag in tags:
                pipe.hgetall(f"{tag}:stats")
            hashes = pipe.execute()
        else:
            hashes = [redis_for(self.settings).hgetall(f"{shard_tag(self.settings, 0)}:stats")]
        out: dict[str, int] = {}
        for raw in hashes:
            for field, value in raw.items():
                name = bytes(field).decode()
                if name.startswith("suppressed:"):
                    op = name.split(":", 1)[1]
                    out[op] = out.get(op, 0) + int(value)
        return out
