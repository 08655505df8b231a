"""One circuit breaker for the whole cluster, its state in Redis, every decision one Lua script.

pybreaker's ``CircuitRedisStorage`` decides in each process (INCR then GET, unconditional
SETs, the worker's own clock): several processes probe at once and a stale success resets
the counters. Here each decision is a single script run by Redis, time comes from Redis
``TIME``, every key shares one hash tag (Redis Cluster), a generation number makes a late
result from an older state harmless, and half-open probes are expiring leases so a killed
worker cannot wedge the breaker.

Trip rule (as resilience4j / Polly): failure rate over a sliding time window once a
minimum number of calls was seen, or a run of consecutive failures. Only transient
outcomes are failures; a permanent 4xx is a success (the service answered) and a 429 is
ignored (it says "slow down", not "down").
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from ._process import PerProcess
from .exceptions import CircuitOpenError
from .settings import Settings
from .store import ScriptCall, key, run_script

__all__ = ["Breaker", "BreakerStatus", "Permit", "State", "add_listener", "breaker_for"]

logger = logging.getLogger("cio_celery.breaker")

Outcome = Literal["success", "failure", "ignore"]
_STATE_NAMES = {0: "closed", 1: "open", 2: "half-open"}

_NOW = """
local function now_t(arg)
  if arg ~= nil and arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# The shared state can be damaged (a hand-edited hash, a key of another type, a foreign
# writer): a breaker that cannot be read is reset to closed, the generation moved on, the
# reset counted in 'corrupt_resets'; the caller logs it as an error. Every script runs this
# first, so none of them fails on damaged state. Returns true when it had to reset.
_SANE = """
local function fix_state(h, permits, win)
  local function kind(k) local t = redis.call('TYPE', k); return t.ok or t end
  local bad = false
  local kh = kind(h)
  if kh ~= 'hash' and kh ~= 'none' then bad = true end
  if kind(permits) ~= 'zset' and kind(permits) ~= 'none' then bad = true end
  if kind(win) ~= 'hash' and kind(win) ~= 'none' then bad = true end
  local gen, total, resets = 0, 0, 0
  if kh == 'hash' then
    local f = redis.call('HMGET', h, 'st', 'gen', 'until', 'cons', 'hs', 'trips', 'closed_at', 'opened_at',
                        'trips_total', 'corrupt_resets', 'forced')
    local st = tonumber(f[1] or '0')
    if st ~= 0 and st ~= 1 and st ~= 2 then bad = true end
    for i = 2, #f do
      if f[i] and not tonumber(f[i]) then bad = true end
    end
    if st == 1 and not tonumber(f[3] or '') and f[11] ~= '1' then bad = true end
    gen = tonumber(f[2] or '0') or 0
    total = tonumber(f[9] or '0') or 0
    resets = tonumber(f[10] or '0') or 0
  end
  if kind(win) == 'hash' and not bad then
    local flat = redis.call('HGETALL', win)
    for i = 1, #flat, 2 do
      local kindc = string.sub(flat[i], 1, 1)
      -- Counts are integers as HINCRBY reads them (not "1.5" or "1e3", which tonumber reads).
      if (kindc ~= 'c' and kindc ~= 'f') or not tonumber(string.sub(flat[i], 2))
          or not string.match(flat[i + 1], '^%-?%d+$') then
        redis.call('HDEL', win, flat[i])
      end
    end
  end
  if not bad then return false end
  redis.call('DEL', h, permits, win)
  redis.call('HSET', h, 'st', 0, 'gen', gen + 1, 'trips_total', total, 'corrupt_resets', resets + 1)
  return true
end
"""

# KEYS: state, permits, window. ARGV: token, lease, clock override, permits allowed.
_ACQUIRE = _NOW + _SANE + """
-- The common case first: a closed breaker whose fields read well allows at once.
local fast = redis.pcall('HMGET', KEYS[1], 'st', 'gen')
if type(fast) == 'table' and not fast.err and (fast[1] == false or fast[1] == '0')
    and (fast[2] == false or tonumber(fast[2])) then
  return {'allow', tostring(tonumber(fast[2] or '0')), '0', ''}
end
local now = now_t(ARGV[3])
local h = KEYS[1]
if fix_state(KEYS[1], KEYS[2], KEYS[3]) then
  return {'allow', redis.call('HGET', h, 'gen'), '0', 'corrupt>closed'}
end
local st = tonumber(redis.call('HGET', h, 'st') or '0')
local gen = tonumber(redis.call('HGET', h, 'gen') or '0')
local changed = ''
if st == 0 then return {'allow', tostring(gen), '0', changed} end
if st == 1 then
  local untl = tonumber(redis.call('HGET', h, 'until') or '0')
  if redis.call('HGET', h, 'forced') == '1' then return {'reject', tostring(gen), '-1', changed} end
  if now < untl then return {'reject', tostring(gen), tostring(untl - now), changed} end
  gen = gen + 1
  redis.call('HSET', h, 'st', 2, 'gen', gen, 'hs', 0)
  redis.call('DEL', KEYS[2])
  changed = 'open>half-open'
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
  return {'probe', tostring(gen), '0', changed}
end
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
return {'reject', tostring(gen), tostring(math.max(0.05, tonumber(first[2]) - now)), changed}
"""

# KEYS: state, permits, window. ARGV: outcome (s/f/i), generation, token, clock override,
# bucket seconds, bucket count, minimum calls, failure rate, consecutive failures,
# open base, open max, jitter fraction, random in [0,1), successes to close.
_RECORD = _NOW + _SANE + """
local h, permits, win = KEYS[1], KEYS[2], KEYS[3]
-- The window's buckets that left it (bucket ``b`` is the current one), dropped when a bucket
-- starts: the hash then holds at most the window's buckets however long nothing fails. A
-- bucket past the current one was counted with a shorter bucket (``breaker_window`` raised
-- since): it goes too, or its counts would stay in the window for good.
local function prune(b, nb)
  local fields = redis.call('HKEYS', win)
  for i = 1, #fields do
    local fb = tonumber(string.sub(fields[i], 2))
    if fb and (fb <= b - nb or fb > b) then redis.call('HDEL', win, fields[i]) end
  end
end
-- The common case first: a success of this generation on a closed breaker whose fields read
-- (state, generation, run of failures) only counts a call in the window: a success cannot trip
-- it. The full check of the state runs with every other record (and with status and the
-- acquire of a breaker that is not plainly closed). A window that does not take the count
-- falls through to the full path, which repairs it.
if ARGV[1] == 's' then
  local fast = redis.pcall('HMGET', h, 'st', 'gen', 'cons')
  if type(fast) == 'table' and not fast.err and (fast[1] == false or fast[1] == '0')
      and tonumber(fast[2] or '0') == tonumber(ARGV[2]) and (fast[3] == false or tonumber(fast[3])) then
    local nb = tonumber(ARGV[6])
    local b = math.floor(now_t(ARGV[4]) / tonumber(ARGV[5]))
    local n = redis.pcall('HINCRBY', win, 'c' .. b, 1)
    if type(n) == 'number' then
      -- A new bucket (once a bucket's seconds) renews the window's life and drops the buckets
      -- that left it.
      if n == 1 then
        redis.call('PEXPIRE', win, math.ceil(tonumber(ARGV[5]) * (nb + 1) * 1000))
        prune(b, nb)
      end
      if fast[3] and fast[3] ~= '0' then redis.call('HSET', h, 'cons', 0) end
      return {'ok', tostring(tonumber(fast[2] or '0')), ''}
    end
  end
end
local now = now_t(ARGV[4])
if fix_state(h, permits, win) then
  return {'corrupt>closed', redis.call('HGET', h, 'gen'), ''}
end
local outcome = ARGV[1]
local st = tonumber(redis.call('HGET', h, 'st') or '0')
local gen = tonumber(redis.call('HGET', h, 'gen') or '0')
local function trip()
  local closed_at = tonumber(redis.call('HGET', h, 'closed_at') or '0')
  local trips = tonumber(redis.call('HGET', h, 'trips') or '0')
  -- A breaker that stayed closed long enough forgets earlier trips.
  if st == 0 and now - closed_at > 2 * tonumber(ARGV[11]) then trips = 0 end
  trips = trips + 1
  local dur = math.min(tonumber(ARGV[11]), tonumber(ARGV[10]) * 2 ^ (trips - 1))
  dur = dur * (1 + tonumber(ARGV[12]) * tonumber(ARGV[13]))
  gen = gen + 1
  redis.call('HSET', h, 'st', 1, 'gen', gen, 'until', now + dur, 'opened_at', now, 'trips', trips,
             'cons', 0, 'hs', 0, 'forced', 0)
  -- Every automatic trip, never forgotten (Prometheus: cio_celery_breaker_trips_total).
  redis.call('HINCRBY', h, 'trips_total', 1)
  redis.call('DEL', win, permits)
  return dur
end
if tonumber(ARGV[2]) ~= gen then
  if ARGV[3] ~= '' then redis.call('ZREM', permits, ARGV[3]) end
  return {'stale', tostring(gen), ''}
end
if st == 0 then
  if outcome == 'i' then return {'ok', tostring(gen), ''} end
  local bsize = tonumber(ARGV[5])
  local nb = tonumber(ARGV[6])
  local b = math.floor(now / bsize)
  if redis.call('HINCRBY', win, 'c' .. b, 1) == 1 then prune(b, nb) end
  local cons = 0
  if outcome == 'f' then
    redis.call('HINCRBY', win, 'f' .. b, 1)
    cons = redis.call('HINCRBY', h, 'cons', 1)
  else
    redis.call('HSET', h, 'cons', 0)
  end
  redis.call('PEXPIRE', win, math.ceil(bsize * (nb + 1) * 1000))
  if outcome ~= 'f' then return {'ok', tostring(gen), ''} end
  local calls, fails = 0, 0
  local flat = redis.call('HGETALL', win)
  for i = 1, #flat, 2 do
    local f, v = flat[i], tonumber(flat[i + 1])
    local fb = tonumber(string.sub(f, 2))
    if fb <= b - nb or fb > b then
      redis.call('HDEL', win, f)
    elseif string.sub(f, 1, 1) == 'c' then
      calls = calls + v
    else
      fails = fails + v
    end
  end
  if cons >= tonumber(ARGV[9]) or (calls >= tonumber(ARGV[7]) and fails >= tonumber(ARGV[8]) * calls) then
    local dur = trip()
    return {'closed>open', tostring(gen), tostring(dur)}
  end
  return {'ok', tostring(gen), ''}
end
if st == 2 then
  local lease = false
  if ARGV[3] ~= '' then lease = redis.call('ZSCORE', permits, ARGV[3]) end
  if not lease then return {'stale', tostring(gen), ''} end
  redis.call('ZREM', permits, ARGV[3])
  -- A lease that expired belongs to a probe presumed dead: its late answer is not evidence.
  if tonumber(lease) <= now then return {'stale', tostring(gen), ''} end
  if outcome == 'i' then return {'ok', tostring(gen), ''} end
  if outcome == 's' then
    local hs = redis.call('HINCRBY', h, 'hs', 1)
    if hs >= tonumber(ARGV[14]) then
      gen = gen + 1
      redis.call('HSET', h, 'st', 0, 'gen', gen, 'cons', 0, 'hs', 0, 'closed_at', now, 'forced', 0)
      redis.call('DEL', win, permits)
      return {'half-open>closed', tostring(gen), ''}
    end
    return {'ok', tostring(gen), ''}
  end
  local dur = trip()
  return {'half-open>open', tostring(gen), tostring(dur)}
end
return {'stale', tostring(gen), ''}
"""

# KEYS: state, permits, window. ARGV: mode (open/close/reset), clock override, open seconds.
_FORCE = _NOW + _SANE + """
local now = now_t(ARGV[2])
local h = KEYS[1]
fix_state(h, KEYS[2], KEYS[3])
local st = tonumber(redis.call('HGET', h, 'st') or '0')
local gen = tonumber(redis.call('HGET', h, 'gen') or '0') + 1
redis.call('DEL', KEYS[2], KEYS[3])
local new = 0
if ARGV[1] == 'open' then
  local forced = 1
  local untl = now + 315360000
  if ARGV[3] ~= '' then forced = 0; untl = now + tonumber(ARGV[3]) end
  redis.call('HSET', h, 'st', 1, 'gen', gen, 'until', untl, 'opened_at', now, 'forced', forced,
             'cons', 0, 'hs', 0)
  new = 1
elseif ARGV[1] == 'close' then
  redis.call('HSET', h, 'st', 0, 'gen', gen, 'cons', 0, 'hs', 0, 'forced', 0)
  -- Closing a closed breaker is no transition: it must not restart the forget-trips timer.
  if st ~= 0 then redis.call('HSET', h, 'closed_at', now) end
else
  local trips_total = redis.call('HGET', h, 'trips_total')
  local resets = redis.call('HGET', h, 'corrupt_resets')
  redis.call('DEL', h)
  redis.call('HSET', h, 'st', 0, 'gen', gen, 'closed_at', now)
  -- Counters: a reset by hand keeps them (trips, the run that sets the open period, goes).
  if trips_total then redis.call('HSET', h, 'trips_total', trips_total) end
  if resets then redis.call('HSET', h, 'corrupt_resets', resets) end
end
return {tostring(st), tostring(new), tostring(gen)}
"""

# KEYS: state, permits, window. ARGV: clock override, bucket seconds, bucket count.
_STATUS = _NOW + _SANE + """
local now = now_t(ARGV[1])
local h = KEYS[1]
local reset = fix_state(h, KEYS[2], KEYS[3])
local st = tonumber(redis.call('HGET', h, 'st') or '0')
local gen = tonumber(redis.call('HGET', h, 'gen') or '0')
local untl = tonumber(redis.call('HGET', h, 'until') or '0')
local forced = redis.call('HGET', h, 'forced') == '1'
local left = 0
if st == 1 then
  if forced then left = -1 else left = math.max(0, untl - now) end
end
local b = math.floor(now / tonumber(ARGV[2]))
local calls, fails = 0, 0
local flat = redis.call('HGETALL', KEYS[3])
for i = 1, #flat, 2 do
  local f, v = flat[i], tonumber(flat[i + 1])
  local fb = tonumber(string.sub(f, 2))
  if fb > b - tonumber(ARGV[3]) and fb <= b then
    if string.sub(f, 1, 1) == 'c' then calls = calls + v else fails = fails + v end
  end
end
local probes = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
return {tostring(st), tostring(gen), tostring(left), redis.call('HGET', h, 'trips') or '0',
        redis.call('HGET', h, 'cons') or '0', tostring(calls), tostring(fails), tostring(probes),
        tostring(now), reset and '1' or '0'}
"""


@dataclass(frozen=True)
class State:
    """A state as pybreaker's listeners see it (they read ``.name``)."""

    name: str


@dataclass(frozen=True)
class Permit:
    """The answer of :meth:`Breaker.acquire`: allowed, probing, or rejected with time left."""

    decision: Literal["allow", "probe", "reject"]
    generation: int
    token: str = ""
    retry_after: float = 0.0  # seconds; -1 when opened by hand (no automatic end)

    @property
    def allowed(self) -> bool:
        return self.decision != "reject"


@dataclass(frozen=True)
class BreakerStatus:
    """A read of the shared state; ``time_left`` is -1 when opened by hand."""

    name: str
    state: str
    generation: int
    time_left: float
    trips: int
    consecutive_failures: int
    window_calls: int
    window_failures: int
    probes_in_flight: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Breaker:
    """The cluster-wide breaker guarding Customer.io, shared by every process through Redis."""

    def __init__(
        self,
        settings: Settings,
        name: str = "customerio",
        listeners: Iterable[Any] = (),
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self._listeners: list[Any] = list(listeners)
        # Tests drive time explicitly; in production Redis TIME is the only clock.
        self._clock = clock
        self._rng = rng or random.Random()
        base = key(settings, "breaker", name)
        self._keys3 = [base, f"{base}:permits", f"{base}:window"]
        self._bucket = max(0.1, settings.breaker_window / 10.0)
        self._buckets = 10

    @property
    def state_key(self) -> str:
        """The hash holding the shared state (field ``st``: 0 closed, 1 open, 2 half-open)."""
        return self._keys3[0]

    # -- pybreaker-compatible surface --------------------------------------------------

    @property
    def listeners(self) -> tuple[Any, ...]:
        return tuple(self._listeners)

    def add_listener(self, listener: Any) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self._listeners.remove(listener)

    @property
    def current_state(self) -> str:
        return self.status().state

    def call(self, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """pybreaker-style call: raises CircuitOpenError when not allowed; any exception is a failure."""
        permit = self.acquire()
        if not permit.allowed:
            raise CircuitOpenError(self.name, None if permit.retry_after < 0 else permit.retry_after)
        for listener in self._listeners:
            _notify(listener, "before_call", self, func, *args, **kwargs)
        start = time.monotonic()
        try:
            result = func(*args, **kwargs)
        except BaseException as exc:
            self.record(permit, "failure", exc=exc)
            raise
        self.record(permit, "success", duration=time.monotonic() - start)
        return result

    # -- decisions ---------------------------------------------------------------------

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    def acquire(self) -> Permit:
        """Ask to call Customer.io: allow (closed), probe (a half-open lease) or reject."""
        call, token = self.acquire_call()
        return self.acquire_result(run_script(self.settings, call.text, call.keys, call.args), token)

    def acquire_call(self) -> tuple[ScriptCall, str]:
        """The acquire script and its probe token, to run with others in one round trip."""
        s = self.settings
        token = secrets.token_hex(8)
        args = [token, s.probe_lease, self._now_arg(), s.breaker_half_open_probes]
        return ScriptCall(_ACQUIRE, self._keys3, args), token

    def acquire_result(self, res: Any, token: str) -> Permit:
        """The permit from the acquire script's answer (announces a transition it made)."""
        decision, gen, retry_after, changed = (_s(x) for x in res)
        if changed:
            self._announce(changed)
        return Permit(
            decision=decision,  # type: ignore[arg-type]
            generation=int(gen),
            token=token if decision == "probe" else "",
            retry_after=float(retry_after),
        )

    def record(
        self,
        permit: Permit,
        outcome: Outcome,
        duration: float | None = None,
        exc: BaseException | None = None,
    ) -> str:
        """Report a call's outcome; returns the transition it caused, ``"ok"`` or ``"stale"``."""
        outcome = self._effective(outcome, duration)
        call = self.record_call(permit, outcome)
        return self.record_result(run_script(self.settings, call.text, call.keys, call.args), outcome, exc)

    def _effective(self, outcome: Outcome, duration: float | None) -> Outcome:
        s = self.settings
        if (
            outcome == "success"
            and duration is not None
            and s.breaker_slow_call > 0
            and duration >= s.breaker_slow_call
        ):
            return "failure"
        return outcome

    def record_call(self, permit: Permit, outcome: Outcome, duration: float | None = None) -> ScriptCall:
        """The record script for one outcome (a slow success counts as a failure)."""
        s = self.settings
        outcome = self._effective(outcome, duration)
        code = {"success": "s", "failure": "f", "ignore": "i"}[outcome]
        return ScriptCall(_RECORD, self._keys3, [
            code, permit.generation, permit.token, self._now_arg(),
            self._bucket, self._buckets, s.breaker_minimum_calls, s.breaker_failure_rate,
            s.breaker_consecutive_failures, s.breaker_open_base, s.breaker_open_max,
            s.breaker_open_jitter, self._rng.random(), s.breaker_close_after,
        ])

    def record_result(self, res: Any, outcome: Outcome, exc: BaseException | None = None) -> str:
        """Tell the listeners, announce a transition; returns it, ``"ok"`` or ``"stale"``."""
        result = _s(res[0])
        if outcome == "failure":
            for listener in self._listeners:
                _notify(listener, "failure", self, exc)
        elif outcome == "success":
            for listener in self._listeners:
                _notify(listener, "success", self)
        if ">" in result:
            self._announce(result, open_for=_s(res[2]))
        return result

    def status(self) -> BreakerStatus:
        res = run_script(self.settings, _STATUS, self._keys3, [self._now_arg(), self._bucket, self._buckets])
        st, gen, left, trips, cons, calls, fails, probes, _now, reset = (_s(x) for x in res)
        if reset == "1":
            self._announce("corrupt>closed")
        return BreakerStatus(
            name=self.name,
            state=_STATE_NAMES[int(st)],
            generation=int(gen),
            time_left=float(left),
            trips=int(trips),
            consecutive_failures=int(cons),
            window_calls=int(calls),
            window_failures=int(fails),
            probes_in_flight=int(probes),
        )

    def open(self, duration: float | None = None) -> None:
        """Open by hand: until :meth:`close`/:meth:`reset`, or for ``duration`` seconds."""
        self._force("open", "" if duration is None else repr(float(duration)))

    def close(self) -> None:
        """Close by hand, forgetting the window and any half-open probes."""
        self._force("close", "")

    def reset(self) -> None:
        """Forget everything, trips included (the generation still moves on)."""
        self._force("reset", "")

    def _force(self, mode: str, duration: str) -> None:
        res = run_script(self.settings, _FORCE, self._keys3, [mode, self._now_arg(), duration])
        old, new, _gen = (_s(x) for x in res)
        new_name = "open" if new == "1" else "closed"
        old_name = _STATE_NAMES[int(old)]
        if old_name != new_name:
            self._announce(f"{old_name}>{new_name}", manual=True)

    # -- announcements -----------------------------------------------------------------

    def _announce(self, transition: str, open_for: str = "", manual: bool = False) -> None:
        """Called only in the process whose script made the change: once for the cluster."""
        old, new = transition.split(">")
        extra = {"cio_event": "breaker_state", "cio_breaker": self.name, "cio_old_state": old,
                 "cio_new_state": new, "cio_manual": manual}
        text = f"cio_celery breaker {self.name}: {old} -> {new}"
        if open_for:
            extra["cio_open_for"] = round(float(open_for), 3)
            text += f" for {float(open_for):.1f}s"
        if manual:
            text += " (by hand)"
        if old == "corrupt":
            # Damaged shared state was reset: an operator should know how it got there.
            logger.error(text + " (the shared state could not be read and was reset)", extra=extra)
        else:
            logger.warning(text, extra=extra)
        for listener in self._listeners:
            _notify(listener, "state_change", self, State(old), State(new))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _notify(listener: Any, method: str, *args: Any, **kwargs: Any) -> None:
    fn = getattr(listener, method, None)
    if fn is None:
        return
    try:
        fn(*args, **kwargs)
    except Exception:
        logger.exception("cio_celery breaker listener %s.%s failed", type(listener).__name__, method)


_global_listeners: list[Any] = []
_breakers: PerProcess[Breaker] = PerProcess()


def add_listener(listener: Any) -> None:
    """Register a pybreaker ``CircuitBreakerListener`` on every breaker of this process."""
    _global_listeners.append(listener)
    for b in _breakers.values():
        b.add_listener(listener)


def breaker_for(settings: Settings) -> Breaker:
    """This process's breaker object for ``settings`` (the state itself lives in Redis)."""
    return _breakers.get(id(settings), lambda: Breaker(settings, listeners=_global_listeners))
