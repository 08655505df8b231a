"""The Redis store of one process: connected lazily, never at import, never shared across a fork."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis
from redis.commands.core import Script

from ._process import PerProcess
from .exceptions import ConfigurationError
from .settings import Settings

__all__ = ["key", "redis_for", "run_script"]

_clients: PerProcess[redis.Redis] = PerProcess()
_scripts: PerProcess[Script] = PerProcess()


def redis_for(settings: Settings) -> redis.Redis:
    """This process's client for the store; raises ConfigurationError if none is configured."""
    url = settings.redis_url
    if not url:
        raise ConfigurationError(
            "redis_url", "is not set and the Celery broker is not Redis (set CIO_REDIS_URL)"
        )
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
    client = redis_for(settings)
    script = _scripts.get((settings.redis_url, text), lambda: client.register_script(text))
    return script(keys=list(keys), args=list(args), client=client)
