"""A cluster-wide rate limiter in Redis: GCRA, one Lua script, one bucket per API.

Celery's ``rate_limit`` is per worker process; Customer.io's limits are per workspace. Every
worker process on every host asks the same Redis key before a request, in the same round
trip as the idempotency claim and the breaker.

GCRA keeps one number per bucket, the *theoretical arrival time* (TAT). A request may start
at ``TAT - burst x interval``; starting it moves TAT on by one ``interval``. The limiter
answers with the wait before the request's slot:

- no wait: go;
- a wait up to ``rate_limit_max_sleep``: the slot is *reserved* (TAT moves on) and the
  worker sleeps that long in place, which costs less than rescheduling the task;
- a longer wait: the slot is reserved too, and the task is rescheduled to it (its countdown
  ends when its slot comes), without spending a retry attempt and without holding a worker
  process. Coming back, it presents the slot and goes without queueing again, so a backlog
  is rescheduled once, each task to a slot of its own, instead of all waking at once.

A 429 pauses the bucket for every worker until its Retry-After ends; a held slot that falls in
a pause is replaced by a new one after it. Time is Redis' ``TIME``,
never a worker's clock. The configured limit is a ceiling: the limiter schedules at
``limit x (1 - rate_limit_headroom)`` so that network jitter between two workers' requests
does not push any 1 s window at Customer.io over the limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .operations import APP_OPERATIONS
from .settings import Settings
from .store import ScriptCall, key, run_script

__all__ = ["Limiter", "Slot", "bucket_of"]

# KEYS: tat, pause. ARGV: interval us, burst, max sleep us, held slot (unix us, 0: none),
# horizon us, late (1: reserve a slot beyond the sleep, 0: decline it, 2: peek, reserve nothing).
# Returns {granted (1/0), wait us, reserved slot (unix us, 0: none)}.
#
# A held slot (reserved on an earlier visit) is honoured when its time has come and no
# pause began since; otherwise the next free slot is reserved, after any pause, unless it is
# beyond the horizon (the longest countdown the task may be given).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- A value that cannot be read (or a key of another type) counts as none and is replaced.
local function num(k)
  local raw = redis.pcall('GET', k)
  if type(raw) == 'table' then redis.call('DEL', k); return 0 end
  return tonumber(raw or '0') or 0
end
local paused = num(KEYS[2])
local held = tonumber(ARGV[4])
if paused <= now and held > 0 and now >= held - tonumber(ARGV[3]) and now <= held + 1000000 then
  local wait = held - now
  if wait < 0 then wait = 0 end
  return {1, wait, 0}
end
local interval = tonumber(ARGV[1])
local tat = num(KEYS[1])
if tat < now then tat = now end
if tat < paused then tat = paused end
local start = tat - (tonumber(ARGV[2]) - 1) * interval
local wait = start - now
if wait < 0 then wait = 0 end
local late = tonumber(ARGV[6] or '1')
if wait > tonumber(ARGV[5]) or (late == 0 and wait > tonumber(ARGV[3])) then
  return {0, wait, 0}
end
if late == 2 then
  if wait > tonumber(ARGV[3]) then return {0, wait, 0} end
  return {1, wait, 0}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1000)
if wait > tonumber(ARGV[3]) then
  return {0, wait, now + wait}
end
return {1, wait, 0}
"""

# KEYS: pause. ARGV: pause us. Extends a pause, never shortens it (slots reserved from now
# on start after it: see _ACQUIRE).
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local untl = now + tonumber(ARGV[1])
local raw = redis.pcall('GET', KEYS[1])
if type(raw) == 'table' then redis.call('DEL', KEYS[1]); raw = false end
local cur = tonumber(raw or '0') or 0
if untl > cur then
  redis.call('SET', KEYS[1], tostring(untl), 'PX', math.floor(tonumber(ARGV[1]) / 1000) + 1000)
end
return 1
"""


def bucket_of(operation: str) -> str:
    """``track`` or ``transactional``: whose limit an operation's request counts against.

    Every App API call the SDK makes is a transactional send (``/v1/send/*``).
    """
    return "transactional" if operation in APP_OPERATIONS else "track"


@dataclass(frozen=True)
class Slot:
    """The limiter's answer: ``granted`` (after sleeping ``wait`` s), or not: come back after
    ``wait`` s, holding the slot ``reserved`` (unix µs; 0 when nothing could be reserved)."""

    granted: bool
    wait: float
    reserved: int = 0


class Limiter:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def rate_of(self, bucket: str) -> float:
        """Requests per second for ``bucket`` (0: unlimited)."""
        s = self.settings
        limit = s.rate_limit_transactional if bucket == "transactional" else s.rate_limit_track
        return limit * (1.0 - s.rate_limit_headroom)

    def _keys(self, bucket: str) -> list[str]:
        return [key(self.settings, "rl", bucket), key(self.settings, "rl", bucket, "pause")]

    def acquire_call(self, bucket: str, held: int = 0, late: int = 1) -> ScriptCall | None:
        """The acquire script; ``held`` is a slot reserved on an earlier visit (unix µs).

        ``late``: 1 reserves a slot further away than ``rate_limit_max_sleep`` (the task is
        rescheduled to it), 0 declines it (the operation goes to the batching buffer instead),
        2 only looks (reserves nothing, even a slot that is free now).
        """
        rate = self.rate_of(bucket)
        if rate <= 0:
            return None
        s = self.settings
        args = [int(1_000_000 / rate), max(1, s.rate_limit_burst), int(s.rate_limit_max_sleep * 1_000_000),
                int(held), int(s.max_countdown * 0.9 * 1_000_000), late]
        return ScriptCall(_ACQUIRE, self._keys(bucket), args)

    @staticmethod
    def acquire_result(res: Any) -> Slot:
        return Slot(granted=bool(int(res[0])), wait=int(res[1]) / 1_000_000, reserved=int(res[2]))

    def acquire(self, bucket: str, held: int = 0) -> Slot:
        call = self.acquire_call(bucket, held)
        if call is None:
            return Slot(True, 0.0)
        return self.acquire_result(run_script(self.settings, call.text, call.keys, call.args))

    def pause_call(self, bucket: str, seconds: float) -> ScriptCall:
        """Stop every worker's requests to ``bucket`` for ``seconds`` (a 429's Retry-After),
        cut to ``retry_after_max``: one answer with a Retry-After of days (a proxy's, a bad
        date) must not stop every worker for that long."""
        seconds = min(max(0.0, seconds), self.settings.retry_after_max) if seconds == seconds else 1.0
        return ScriptCall(_PAUSE, [self._keys(bucket)[1]], [int(seconds * 1_000_000)])

    def pause(self, bucket: str, seconds: float) -> None:
        call = self.pause_call(bucket, seconds)
        run_script(self.settings, call.text, call.keys, call.args)
