"""Idempotency claims: an operation reaches Customer.io once per idempotency key.

A worker claims the key with ``SET NX PX`` (a lease holding its owner token) before it
calls Customer.io; marks it done only after a success (kept ``idempotency_retention``);
and on any other outcome releases only its own claim (compare-and-delete). A claim held
by another worker means "try again later", never "drop"; a done key means the operation
is skipped and counted as a suppressed duplicate.

Key names hold a hash of the operation and its key, never customer data:
``{prefix}:idem:<sha256 hex>``. Beside each live claim an *attempt marker* (kept as long
as a done key) counts the attempts that started and never finished: the next claim
reports them (``lost_attempts``), which tells a transactional send that its previous
attempt died mid-call and may have been applied, and stops an operation that kills its
worker every time from being redelivered for ever.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from .settings import Settings
from .store import ScriptCall, key, redis_for, run_script

__all__ = ["Claim", "Claims"]

# KEYS: claim, attempt marker, stats hash. ARGV: token, lease ms, retention ms, operation, task id.
_CLAIM = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then
  -- none, or a key of another type that no claim can be read from: replaced.
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
if v and string.sub(v, 1, 2) == 'x:' then
  -- Dead-lettered: a redelivered copy of that message stops; another message with the same
  -- key (the caller enqueued it again, fixed) is a new attempt.
  if string.sub(v, 3) == ARGV[5] then return {'dead', 0} end
  redis.call('SET', KEYS[1], 'c:' .. ARGV[1], 'PX', ARGV[2])
  local lost = redis.call('INCR', KEYS[2]) - 1
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  return {'claimed', lost}
end
local left = redis.call('PTTL', KEYS[1])
if left < 0 then
  -- A claim that would never end (written without a lease): give it one, so that it ends.
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  left = tonumber(ARGV[2])
end
return {'held', left}
"""

# KEYS: claim, attempt marker. ARGV: token, retention ms, task id.
# Marked done whoever holds the lease now: the operation was applied.
_DONE = """
local v = redis.call('GET', KEYS[1])
redis.call('SET', KEYS[1], 'd:' .. ARGV[3], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
if v == 'c:' .. ARGV[1] then return 1 end
return 0
"""

# KEYS: claim, attempt marker. ARGV: token, retention ms, task id.
# Written in the same script as the dead letter: a redelivered copy of a dead-lettered
# operation finds it and stops, instead of calling again.
_DEAD = """
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'x:' .. ARGV[3], 'PX', ARGV[2])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS: claim, attempt marker. ARGV: token. Only the owner's claim goes.
_RELEASE = """
if redis.call('GET', KEYS[1]) == 'c:' .. ARGV[1] then
  redis.call('DEL', KEYS[1], KEYS[2])
  return 1
end
return 0
"""

State = Literal["claimed", "done", "held", "dead"]


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
    """The claims of one settings' store."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stats = key(settings, "stats")

    def keys_for(self, operation: str, idempotency_key: str) -> tuple[str, str]:
        digest = hashlib.sha256(f"{operation}\x00{idempotency_key}".encode()).hexdigest()
        base = key(self.settings, "idem", digest)
        return base, f"{base}:attempt"

    def claim_call(self, operation: str, idempotency_key: str, task_id: str = "") -> tuple[
            ScriptCall, tuple[str, str], str]:
        s = self.settings
        keys = self.keys_for(operation, idempotency_key)
        token = secrets.token_hex(8)
        args = [token, int(s.claim_lease * 1000), int(s.idempotency_retention * 1000), operation, task_id]
        return ScriptCall(_CLAIM, [*keys, self._stats], args), keys, token

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
        return ScriptCall(_DONE, list(claim.keys), [claim.token, int(self.settings.idempotency_retention * 1000),
                                                    task_id])

    def dead_call(self, claim: Claim, task_id: str) -> ScriptCall:
        """Mark our claim dead-lettered (run it with the dead letter's own script)."""
        return ScriptCall(_DEAD, list(claim.keys), [claim.token, int(self.settings.idempotency_retention * 1000),
                                                    task_id])

    def release_call(self, claim: Claim) -> ScriptCall:
        return ScriptCall(_RELEASE, list(claim.keys), [claim.token])

    def done(self, claim: Claim, task_id: str) -> bool:
        """Mark delivered; False when our lease had run out first (another worker may be calling)."""
        call = self.done_call(claim, task_id)
        return bool(run_script(self.settings, call.text, call.keys, call.args))

    def release(self, claim: Claim) -> bool:
        call = self.release_call(claim)
        return bool(run_script(self.settings, call.text, call.keys, call.args))

    def state_of(self, operation: str, idempotency_key: str) -> str | None:
        """``done``, ``dead``, ``claimed`` or None: for tests, the CLI and the health view."""
        raw: Any = redis_for(self.settings).get(self.keys_for(operation, idempotency_key)[0])
        if raw is None:
            return None
        return {b"d:": "done", b"x:": "dead"}.get(bytes(raw)[:2], "claimed")

    def suppressed(self) -> dict[str, int]:
        """Suppressed duplicates per operation since the stats were last reset."""
        raw: Any = redis_for(self.settings).hgetall(self._stats)
        out: dict[str, int] = {}
        for field, value in raw.items():
            name = bytes(field).decode()
            if name.startswith("suppressed:"):
                out[name.split(":", 1)[1]] = int(value)
        return out
