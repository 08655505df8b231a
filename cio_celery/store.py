"""The Redis store of one process: connected lazily, never at import, never shared across a fork."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

from ._process import PerProcess
from .exceptions import ConfigurationError
from .settings import Settings

__all__ = ["ScriptCall", "key", "redis_for", "run_script", "run_scripts"]

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
    return _clients.get(
        url,
        lambda: redis.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=2.0, health_check_interval=15, decode_responses=False
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


def run_scripts(settings: Settings, calls: Sequence[ScriptCall]) -> list[Any]:
    """Run several scripts in one round trip (a pipeline of EVALSHA, not a transaction).

    Each script is atomic on its own; a script the server does not know yet (NOSCRIPT,
    after a restart or a failover) did not run, so it is loaded and run again alone.
    A script's own error is raised after the others have run.
    """
    if len(calls) == 1:
        c = calls[0]
        return [run_script(settings, c.text, c.keys, c.args)]
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
