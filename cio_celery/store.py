"""The Redis store of one process: connected lazily, never at import, never shared across a fork."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from ._process import PerProcess
from .exceptions import ConfigurationError
from .settings import Settings

__all__ = ["ScriptCall", "combine", "key", "redis_for", "run_pipelined", "run_script", "run_scripts"]

_clients: PerProcess[redis.Redis] = PerProcess()
_scripts: PerProcess[Script] = PerProcess()


# A redis_url of this form names a django-redis cache alias whose connection pool is reused.
DJANGO_REDIS_SCHEME = "django-redis://"


def redis_for(settings: Settings) -> redis.Redis:
    """This process's client for the store; raises ConfigurationError if none is configured."""
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
    timeout = min(5.0, max(0.25, settings.task_time_limit / 5))
    return _clients.get(
        (url, timeout),
        lambda: redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=min(2.0, timeout),
            health_check_interval=15, decode_responses=False,
        ),
    )


def key(settings: Settings, *parts: str) -> str:
    """A store key; the ``{prefix}`` hash tag keeps all of them in one Redis Cluster slot."""
    return ":".join(("{" + settings.key_prefix + "}", *parts))


def run_script(settings: Settings, text: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """Run a Lua script by its SHA (EVALSHA), loading it once per server, not sending it every call."""
    return _script(settings, text)(keys=list(keys), args=list(args), client=redis_for(settings))


@dataclass(frozen=True)
class ScriptCall:
    """One Lua script run, to be sent with others in one round trip by :func:`run_scripts`."""

    text: str
    keys: Sequence[str]
    args: Sequence[Any]


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
    and is raised. Every key shares the ``{prefix}`` hash tag, so Redis Cluster accepts them
    in one script.
    """
    if len(calls) == 1:
        c = calls[0]
        return [run_script(settings, c.text, c.keys, c.args)]
    one = combine(calls)
    result: list[Any] = run_script(settings, one.text, one.keys, one.args)
    return result


def combine(calls: Sequence[ScriptCall]) -> ScriptCall:
    """One script call running ``calls`` in order, atomically; it answers the list of their
    answers (see :func:`run_scripts`; :func:`run_pipelined` sends many such in one round trip)."""
    keys: list[str] = []
    args: list[Any] = []
    for c in calls:
        args += [len(c.keys), len(c.args)]
    for c in calls:
        keys += list(c.keys)
        args += list(c.args)
    return ScriptCall(_combined(tuple(c.text for c in calls)), keys, args)


def run_pipelined(settings: Settings, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run many scripts in one round trip as a pipeline of EVALSHA (each atomic on its own).

    For long lists of the same scripts (a batch's claims), where one combined script would
    be a new script per list length. A script the server does not know yet (NOSCRIPT, after
    a restart or a failover) did not run: it is loaded and run again alone. The first
    script error is raised after the others have run.
    """
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
