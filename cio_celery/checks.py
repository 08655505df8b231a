"""Start-up checks: the Celery and Redis settings that cio_celery's guarantees rest on.

:func:`recommended_celery_config` gives the Celery settings to apply; :func:`check_configuration`
inspects an app (and optionally the worker's queues and the store's Redis) and lists what
breaks a guarantee; :func:`check_worker` does both from a ``worker_ready`` signal and logs
the result. Messages name settings and values, never a URL or a credential.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from .exceptions import ConfigurationError
from .settings import REDIS_DEFAULT_VISIBILITY_TIMEOUT, SETTINGS, Settings, settings_for_app
from .store import redis_for

__all__ = [
    "REMOTE_COMMAND",
    "ConfigProblem",
    "check_configuration",
    "check_worker",
    "consumer_queues",
    "credential_gaps",
    "log_configuration_problems",
    "recommended_celery_config",
    "where_set",
]

logger = logging.getLogger("cio_celery.checks")

ERROR = "error"
WARNING = "warning"

_ENV = {s.name: s.env for s in SETTINGS}
_VT = "broker_transport_options.visibility_timeout"
_CT = "broker_transport_options.consumer_timeout"
_CONFIRM = "broker_transport_options.confirm_publish"

#: RabbitMQ's default ``consumer_timeout`` (30 min), in seconds.
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT = 1800.0
_AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})
_REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel", "socket", "unix"})


#: The remote control command every worker running cio_celery answers (see :mod:`cio_celery.health`).
REMOTE_COMMAND = "cio_status"

# Where recommended_celery_config() looks for the three values it needs.
_RECOMMENDED_FROM_ENV = ("visibility_timeout", "task_time_limit", "timeout")
_BY_NAME = {s.name: s for s in SETTINGS}


def _env(name: str) -> str:
    """The ``CIO_*`` environment variable of a settings field (the name users set)."""
    return _ENV.get(name, name)


def where_set(setting: str, app: Any = None) -> str:
    """Where the user sets what a ConfigurationError names: the ``CIO_*`` variable when it is set in
    the environment, else the Celery setting ``cio_<name>`` when the app has it, else the variable."""
    name = setting.rsplit(".", 1)[-1]  # "settings.timeout" / "celery conf cio.timeout" -> "timeout"
    if name not in _ENV:
        return setting  # already a variable (CIO_TIMEOUT cannot be parsed) or a Celery setting
    if os.environ.get(_ENV[name]):
        return _ENV[name]
    try:
        if app is not None and app.conf.get(f"cio_{name}") is not None:
            return f"cio_{name}"
    except Exception:  # noqa: BLE001, S110 - an unreadable conf: name the variable
        pass
    return _ENV[name]


def credential_gaps(settings: Settings) -> list[str]:
    """The variables of the credentials ``settings`` lacks (``CIO_SITE_ID``, ``CIO_TRACK_API_KEY``,
    ``CIO_APP_API_KEY``), whichever source was meant to set them."""
    names = (("site_id", "CIO_SITE_ID"), ("track_api_key", "CIO_TRACK_API_KEY"), ("app_api_key", "CIO_APP_API_KEY"))
    return [env for name, env in names if not getattr(settings, name)]


def _lenient_settings() -> Settings:
    """Defaults with the environment's values of the few settings recommended_celery_config() reads.

    A bad value is left to the checks (``manage.py check``, the worker's start-up log), which name
    it: a project's celery.py calls this at import, where raising would stop ``manage.py check``
    itself with a traceback.
    """
    values: dict[str, Any] = {}
    for name in _RECOMMENDED_FROM_ENV:
        raw = os.environ.get(_ENV[name])
        if not raw:
            continue
        try:
            value = _BY_NAME[name].parse(raw)
        except ValueError:
            continue
        if isinstance(value, float) and value > 0 and value < float("inf"):
            values[name] = value
    try:
        return Settings(**values)
    except ConfigurationError:
        return Settings()


def _transport_kind_of(transport: str | None) -> str:
    """``redis``, ``amqp`` or ``other`` for a kombu transport name or a broker URL (None: ``redis``).

    ``amqp``, ``amqps``, ``pyamqp`` and ``librabbitmq`` are RabbitMQ; ``redis``, ``rediss``,
    ``sentinel`` and ``socket``/``unix`` are Redis. Of a failover list (``url1;url2``) the first counts.
    """
    if not transport:
        return "redis"
    first = str(transport).split(";", 1)[0].strip()
    scheme = first.split("://", 1)[0] if "://" in first else first
    scheme = scheme.split("+", 1)[0].lower()
    if scheme in _AMQP_SCHEMES:
        return "amqp"
    if scheme in _REDIS_SCHEMES:
        return "redis"
    return "other"


def _common_config() -> dict[str, Any]:
    return {
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_reject_on_worker_lost": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
    }


def _countdown_bound_for(consumer_timeout: float, task_time_limit: float) -> float | None:
    """The ``CIO_VISIBILITY_TIMEOUT`` that keeps a held countdown plus one attempt below RabbitMQ's
    ``consumer_timeout``: ``consumer_timeout - task_time_limit`` (None when no value fits).

    The longest countdown is 90 % of it (``Settings.max_countdown``), so the hold is at most
    ``0.9 x consumer_timeout + 0.1 x task_time_limit``: a tenth of the rest is the margin.
    """
    bound = float(consumer_timeout) - float(task_time_limit)
    return bound if bound >= 2.0 else None  # settings refuse a visibility timeout below 2 s


def _amqp_config(s: Settings, visibility_timeout: float | None, consumer_timeout: float | None) -> dict[str, Any]:
    ct = RABBITMQ_DEFAULT_CONSUMER_TIMEOUT if consumer_timeout is None else float(consumer_timeout)
    config = {
        **_common_config(),
        "task_default_delivery_mode": "persistent",
        # confirm_publish: py-amqp waits for RabbitMQ's confirm (persisted) before a publish returns.
        # consumer_timeout: read by cio_celery's checks only (py-amqp ignores unknown options).
        "broker_transport_options": {"confirm_publish": True, "consumer_timeout": ct},
    }
    if visibility_timeout is None:
        visibility_timeout = s.visibility_timeout if s.visibility_timeout is not None else (
            _countdown_bound_for(ct, s.task_time_limit) if 0 < ct < math.inf else None)
    if visibility_timeout is not None:
        config["cio_visibility_timeout"] = float(visibility_timeout)
    return config


def recommended_celery_config(
    settings: Settings | None = None,
    *,
    visibility_timeout: float | None = None,
    transport: str | None = None,
    consumer_timeout: float | None = None,
) -> dict[str, Any]:
    """The Celery settings cio_celery needs, for ``app.conf.update(recommended_celery_config())``.

    ``transport`` is the broker's kombu transport or URL (``"amqp"``, ``app.conf.broker_url``);
    without it, the Redis transport's settings. For every transport:

    - ``task_acks_late``: acknowledge a message after the delivery, so a dead worker's operation is redelivered.
    - ``worker_prefetch_multiplier`` 1: no operation waits, held unacknowledged, behind a slow delivery.
    - ``task_reject_on_worker_lost``: a killed worker process requeues its operation instead of acknowledging it.
    - ``worker_cancel_long_running_tasks_on_connection_loss`` off: Celery would terminate the pool process of
      every delivery whose ack failed with the connection, even one that had finished (the process is then
      running another delivery); the chaos suite saw it crash the worker. A delivery that keeps running
      while its message is redelivered is safe: the copy finds the claim held, then done.
    - ``broker_connection_retry_on_startup``: a worker started while the broker is down waits for it.

    Redis (the default) adds ``broker_transport_options`` (kombu's Redis transport reads them):

    - ``visibility_timeout``: seconds before an unacknowledged message is redelivered; it must outlast
      the longest countdown plus one attempt (default: ``CIO_VISIBILITY_TIMEOUT``, else
      ``max(3600, 10 x (task_time_limit + timeout))``; 3600 is Redis' default, which ``max_countdown`` assumes).
    - ``socket_timeout`` 5: a publish or ack on a dead connection fails instead of hanging.
    - ``socket_connect_timeout`` 5: connecting to an unreachable broker fails within 5 s.
    - ``unacked_restore_interval`` 1.0: seconds between kombu's sweeps for abandoned unacked messages.
    - ``unacked_restore_throttle`` 1: every sweep scans (kombu's default scans every 10th: one per 100 s).

    RabbitMQ (``transport="amqp"``, see docs/rabbitmq.md) instead of the Redis options:

    - ``task_default_delivery_mode`` ``persistent``: RabbitMQ writes every operation to disk.
    - ``broker_transport_options``: ``confirm_publish`` (a publish returns once RabbitMQ has the
      message: a retry or a release is never lost between the worker and the broker), and
      ``consumer_timeout``, the broker's own in seconds (``consumer_timeout``; RabbitMQ's default
      1800 s), which the checks compare with the longest countdown; py-amqp ignores it.
    - ``cio_visibility_timeout``: on RabbitMQ it only bounds the package's countdowns (90 % of it),
      so that a worker never holds a countdown message plus one attempt longer than
      ``consumer_timeout``: ``consumer_timeout - task_time_limit`` unless ``CIO_VISIBILITY_TIMEOUT``
      or ``visibility_timeout`` says otherwise.

    Another transport gets the settings common to all. ``broker_transport_options`` replaces the
    app's whole mapping: merge your own keys (a Sentinel ``master_name`` ...) into it. Without
    ``settings`` it reads only ``CIO_VISIBILITY_TIMEOUT``, ``CIO_TASK_TIME_LIMIT`` and
    ``CIO_TIMEOUT`` from the environment, and never raises: a bad value there (or in any other
    setting, or an unknown transport) is reported by the checks, naming the variable, not by a
    traceback at import.
    """
    s = _lenient_settings() if settings is None else settings
    kind = _transport_kind_of(transport)
    if kind == "amqp":
        try:
            return _amqp_config(s, visibility_timeout, consumer_timeout)
        except (TypeError, ValueError):  # a consumer_timeout that is not a number: the checks name it
            return _amqp_config(s, visibility_timeout, None)
    if kind == "other":
        return _common_config()
    if visibility_timeout is None:
        if s.visibility_timeout is not None:
            visibility_timeout = s.visibility_timeout
        else:
            # max_countdown is 90 % of it (for >= 600 s): the remaining 10 % covers one attempt.
            visibility_timeout = max(REDIS_DEFAULT_VISIBILITY_TIMEOUT, 10.0 * (s.task_time_limit + s.timeout))
    options: dict[str, Any] = {
        "visibility_timeout": float(visibility_timeout),
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "unacked_restore_interval": 1.0,
        "unacked_restore_throttle": 1,
    }
    return {**_common_config(), "broker_transport_options": _known_to_kombu(options)}


def _known_to_kombu(options: dict[str, Any]) -> dict[str, Any]:
    """The Redis transport options the installed kombu reads (the unacked_restore_* pair came with
    kombu 5.7; with an older one the sweep keeps kombu's own pace)."""
    try:
        from kombu.transport.redis import Channel
    except ImportError:  # the transport's own dependencies are missing: the checks say so
        return options
    known = set(Channel.from_transport_options)
    return {k: v for k, v in options.items() if k in known}


@dataclass(frozen=True)
class ConfigProblem:
    """One configuration problem: the setting to change, what is wrong, ``error`` or ``warning``."""

    setting: str
    problem: str
    severity: str  # "error" | "warning"

    def __str__(self) -> str:
        return f"{self.setting}: {self.problem} ({self.severity})"


def _fmt(seconds: float) -> str:
    return f"{seconds:g} s"


def _names(names: list[str], total: int) -> str:
    if len(names) == total and total > 1:
        return f"all {total} cio_celery tasks"
    return ", ".join(sorted(names))


def _cio_tasks(app: Any) -> list[Any]:
    from .tasks import CioTask  # late: tasks imports the worker wiring, which may import this module

    return [task for task in list(app.tasks.values()) if isinstance(task, CioTask)]


def _acks_on_timeout(task: Any) -> bool:
    explicit = getattr(task, "acks_on_timeout", None)  # Celery >= 5.5; 5.4 has only the combined flag
    return bool(task.acks_on_failure_or_timeout if explicit is None else explicit)


# (setting, is the task wrong, what is wrong with it); each is an error: the operation is lost.
_TASK_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("task_acks_late", lambda t: not t.acks_late,
     "acks_late is off for {tasks} (task_annotations or a subclass): the message is acknowledged "
     "before the delivery, so a worker that dies mid-delivery loses the operation; "
     "app.conf.update(recommended_celery_config()) turns it on"),
    ("task_reject_on_worker_lost", lambda t: not t.reject_on_worker_lost,
     "reject_on_worker_lost is off for {tasks}: an operation whose worker process is killed is "
     "acknowledged and lost instead of requeued; app.conf.update(recommended_celery_config()) turns it on"),
    ("task_acks_on_timeout", _acks_on_timeout,
     "acks_on_timeout is on for {tasks}: a delivery killed by the hard time limit is acknowledged "
     "and lost instead of requeued"),
]


def _check_tasks(app: Any) -> list[ConfigProblem]:
    tasks = _cio_tasks(app)
    problems: list[ConfigProblem] = []
    for setting, wrong, text in _TASK_RULES:
        names = [t.name for t in tasks if wrong(t)]
        if names:
            problems.append(ConfigProblem(setting, text.format(tasks=_names(names, len(tasks))), ERROR))
    return problems


def _recommended_call(kind: str) -> str:
    return "recommended_celery_config(transport='amqp')" if kind == "amqp" else "recommended_celery_config()"


def _check_worker_settings(conf: Any, kind: str = "redis") -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    multiplier = conf.worker_prefetch_multiplier
    # worker_disable_prefetch (Celery >= 5.6) fetches only what the pool can run; Celery ignores it
    # on any broker but Redis.
    if not (kind == "redis" and conf.get("worker_disable_prefetch", False)) and multiplier != 1:
        shown = f"{multiplier} (unlimited)" if multiplier == 0 else str(multiplier)
        problems.append(ConfigProblem(
            "worker_prefetch_multiplier",
            f"is {shown}; set it to 1 (app.conf.update({_recommended_call(kind)}) does): a prefetched "
            "operation waits behind a slow delivery, and with acks_late it is held unacknowledged all the while",
            WARNING,
        ))
    if conf.worker_cancel_long_running_tasks_on_connection_loss:
        problems.append(ConfigProblem(
            "worker_cancel_long_running_tasks_on_connection_loss",
            "is on: after a broker connection loss Celery terminates the pool process of every delivery whose "
            "ack failed, even one that had finished and whose process runs another delivery by then (in the "
            "chaos suite this crashed the worker); the idempotency claims already make a delivery that keeps "
            f"running while its message is redelivered safe; app.conf.update({_recommended_call(kind)}) "
            "turns it off",
            WARNING,
        ))
    if conf.task_always_eager:
        problems.append(ConfigProblem(
            "task_always_eager",
            "is on: operations run inline in the caller, without the broker; retries do not wait and nothing "
            "survives a crash (tests only)",
            WARNING,
        ))
    return problems


def _broker_transport(app: Any) -> Any:
    """The class of the app's broker transport, without connecting; None when it cannot be resolved."""
    try:
        from kombu.transport import resolve_transport

        conn = app.connection_for_write()
        try:
            return resolve_transport(conn.transport_cls)
        finally:
            conn.release()
    except Exception:  # noqa: BLE001 - reported by _check_transport when it is an ImportError
        return None


def _broker_is_redis(app: Any) -> bool:
    """Whether the app's broker transport is kombu's Redis transport (or Sentinel), without connecting."""
    try:
        from kombu.transport.redis import Transport as RedisTransport

        transport = _broker_transport(app)
        return isinstance(transport, type) and issubclass(transport, RedisTransport)
    except Exception:  # noqa: BLE001 - an unknown transport is not Redis
        return False


def _broker_kind(app: Any) -> str:
    """``redis``, ``amqp`` (py-amqp or librabbitmq: RabbitMQ) or ``other``, from the resolved transport."""
    if _broker_is_redis(app):
        return "redis"
    transport = _broker_transport(app)
    return "amqp" if getattr(transport, "driver_type", None) == "amqp" else "other"


def _check_transport(app: Any) -> list[ConfigProblem]:
    """The broker's kombu transport imports: a missing dependency (kombu's Redis transport needs
    ``packaging``, from ``celery[redis]``) makes every publish fail and every worker die at start."""
    url = str(app.conf.broker_write_url or app.conf.broker_url or "amqp://")
    scheme = url.split("://")[0].split("+")[0]
    try:
        from kombu.transport import resolve_transport

        conn = app.connection_for_write()  # kombu imports the transport here already
        try:
            resolve_transport(conn.transport_cls)
        finally:
            conn.release()
    except ImportError as exc:
        return [ConfigProblem(
            "broker_url",
            f"the broker's transport {scheme!r} cannot be loaded ({type(exc).__name__}: {exc}): "
            "workers die at start and .delay() spools every operation; install it with pip install "
            "'celery[redis]' (a dependency of cio-celery: reinstall the package)",
            ERROR,
        )]
    except Exception:  # noqa: BLE001, S110 - a URL or transport name Celery cannot parse is Celery's to report
        pass
    return []


def _broker_visibility_timeout(conf: Any) -> float:
    from kombu.transport.redis import Channel

    options = conf.broker_transport_options or {}
    value = options.get("visibility_timeout")
    return float(Channel.visibility_timeout if value is None else value)


def _check_visibility_timeout(app: Any, s: Settings) -> list[ConfigProblem]:
    if not _broker_is_redis(app):
        return []
    try:
        vt = _broker_visibility_timeout(app.conf)
    except (TypeError, ValueError):
        return [ConfigProblem(_VT, "is not a number of seconds", ERROR)]
    attempt = s.task_time_limit + s.timeout
    if vt < attempt:
        return [ConfigProblem(
            _VT,
            f"is {_fmt(vt)}, less than CIO_TASK_TIME_LIMIT + CIO_TIMEOUT ({_fmt(attempt)}): a delivery "
            "still running is redelivered to a second worker",
            ERROR,
        )]
    longest = s.max_countdown
    if vt < longest:
        if s.visibility_timeout is not None:
            source = f"CIO_VISIBILITY_TIMEOUT ({_fmt(s.visibility_timeout)})"
        else:
            source = f"Redis' default visibility timeout ({_fmt(REDIS_DEFAULT_VISIBILITY_TIMEOUT)})"
        return [ConfigProblem(
            "CIO_VISIBILITY_TIMEOUT" if s.visibility_timeout is not None else _VT,
            f"mismatch: the broker's {_VT} is {_fmt(vt)} but cio_celery schedules countdowns up to "
            f"{_fmt(longest)} from {source}: countdowns longer than the broker's visibility timeout run "
            f"twice; make CIO_VISIBILITY_TIMEOUT and {_VT} equal",
            ERROR,
        )]
    if vt < longest + s.task_time_limit:
        return [ConfigProblem(
            "CIO_TASK_TIME_LIMIT",
            f"is {_fmt(s.task_time_limit)}: a retry held for the longest countdown ({_fmt(longest)}) and then "
            f"running up to the time limit outlives the broker's {_VT} ({_fmt(vt)}) and is redelivered "
            "while it runs; raise the visibility timeout (recommended_celery_config() picks one) or lower "
            "the time limit",
            ERROR,
        )]
    return []


# -- RabbitMQ (the amqp transport) --------------------------------------------------------------


def _cio_queue_declarations(app: Any, s: Settings | None) -> list[Any]:
    """The kombu queues the operations and the released parked ones go to, as Celery declares them:
    from ``task_queues``, else as Celery creates a missing queue (without adding it to the app)."""
    s = s or Settings()
    queues = app.amqp.queues
    out = []
    for name in s.queues:
        queue = dict.get(queues, name)  # dict.get: Queues.__missing__ would add the queue to the app
        out.append(queue if queue is not None else queues.new_missing(name))
    return out


def _queues(queues: list[Any]) -> str:
    names = ", ".join(repr(q.name) for q in queues)
    return f"queue {names} is" if len(queues) == 1 else f"queues {names} are"


def _queue_type(queue: Any) -> str:
    return str((queue.queue_arguments or {}).get("x-queue-type") or "classic")


def _celery_has_quorum_support() -> bool:
    import celery

    return tuple(celery.VERSION[:2]) >= (5, 5)


def _check_confirms(app: Any) -> list[ConfigProblem]:
    transport = _broker_transport(app)
    if "librabbitmq" in str(getattr(transport, "__module__", "")):
        return [ConfigProblem(
            "broker_url",
            "uses librabbitmq, which has no publisher confirms: a retry, a reschedule or a release to the "
            "fallback queue can be lost between the worker and RabbitMQ; use py-amqp (pyamqp://)",
            ERROR,
        )]
    options = app.conf.broker_transport_options or {}
    if not options.get("confirm_publish"):
        return [ConfigProblem(
            _CONFIRM,
            "is off: with task_acks_late a worker acknowledges an operation once its retry, reschedule or "
            "release is published, but without publisher confirms a publish returns before RabbitMQ has the "
            "message, so a connection or broker failure in between loses the operation (and .delay() cannot "
            "tell it to spool); set broker_transport_options={'confirm_publish': True, ...} "
            f"({_recommended_call('amqp')} does)",
            ERROR,
        )]
    return []


def _check_durability(conf: Any, queues: list[Any]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    if str(conf.get("task_default_delivery_mode")).lower() in {"1", "transient"}:
        problems.append(ConfigProblem(
            "task_default_delivery_mode",
            "is transient: RabbitMQ keeps the operations in memory only, and a restart loses every one "
            "waiting in a queue; set it to 'persistent' (Celery's default)",
            ERROR,
        ))
    for queue in queues:
        wrong = []
        if not queue.durable:
            wrong.append("not durable")
        if queue.auto_delete:
            wrong.append("auto_delete")
        if queue.exclusive:
            wrong.append("exclusive")
        exchange = queue.exchange
        if exchange is not None and exchange.name and not exchange.durable:
            wrong.append(f"bound to the non-durable exchange {exchange.name!r}")
        if exchange is not None and str(exchange.delivery_mode).lower() in {"1", "transient"}:
            wrong.append(f"bound to the exchange {exchange.name!r}, whose messages are transient")
        if wrong:
            problems.append(ConfigProblem(
                "task_queues",
                f"queue {queue.name!r} is {', '.join(wrong)}: a RabbitMQ restart (or, for auto_delete and "
                "exclusive, its consumers leaving) loses the operations waiting in it; declare it durable, "
                "not auto_delete, on a durable exchange (Celery's defaults)",
                ERROR,
            ))
    return problems


def _check_quorum(conf: Any, quorum: list[Any]) -> list[ConfigProblem]:
    if not quorum:
        return []
    if not _celery_has_quorum_support():
        import celery

        return [ConfigProblem(
            "task_queues",
            f"{_queues(quorum)} quorum, and Celery {celery.__version__} consumes with global QoS prefetch, "
            "which RabbitMQ refuses on quorum queues: the worker cannot consume them; use Celery 5.5 or later",
            ERROR,
        )]
    if not conf.get("worker_detect_quorum_queues", True):
        return [ConfigProblem(
            "worker_detect_quorum_queues",
            f"is off while {_queues(quorum)} quorum: the worker asks for global QoS prefetch, which RabbitMQ "
            "refuses on quorum queues, so it cannot consume them; turn it on (Celery's default)",
            ERROR,
        )]
    direct = [q for q in quorum if q.exchange is None or q.exchange.type == "direct"]
    if direct:
        return [ConfigProblem(
            "task_queues",
            f"quorum {_queues(direct)} bound to a direct exchange, so Celery's native delayed delivery is off: "
            "a worker holds every countdown (retries, rate-limit and store waits) unacknowledged until it is "
            "due, and as a quorum queue's prefetch is static, each one held takes a prefetch slot; bind them "
            "to a topic exchange "
            "(task_create_missing_queue_exchange_type='topic', or Exchange(name, type='topic') in task_queues)",
            WARNING,
        )]
    return []


def _countdown_source(app: Any) -> str:
    """The setting that bounds the countdowns, named where the user set it."""
    env = _env("visibility_timeout")
    if os.environ.get(env):
        return env
    if app.conf.get("cio_visibility_timeout") is not None:
        return "cio_visibility_timeout"
    if (app.conf.broker_transport_options or {}).get("visibility_timeout") is not None:
        return _VT
    return env


_STOPS = ("the worker stops (Celery: Unrecoverable error: PreconditionFailed) and every message it held goes "
          "to the next worker, which may stop the same way;")


def _check_consumer_timeout(app: Any, s: Settings, queues: list[Any], native_delay: bool) -> list[ConfigProblem]:
    """A worker holds a countdown message unacknowledged until it is due, then runs it; RabbitMQ closes
    the channel of a consumer holding a message longer than ``consumer_timeout``, and Celery's worker
    stops on that (``Unrecoverable error: PreconditionFailed``, tests/test_rabbitmq.py)."""
    raw = (app.conf.broker_transport_options or {}).get("consumer_timeout")
    if raw is None:
        broker_ct = RABBITMQ_DEFAULT_CONSUMER_TIMEOUT
        source = "RabbitMQ's default, assumed: declare yours as broker_transport_options['consumer_timeout'], seconds"
    else:
        try:
            broker_ct = float(raw)
        except (TypeError, ValueError):
            return [ConfigProblem(_CT, "is not a number of seconds (RabbitMQ's consumer_timeout, 0: off)", ERROR)]
        source = "broker_transport_options['consumer_timeout']"
    for queue in queues or [None]:
        ct, where = broker_ct, source
        argument = (queue.queue_arguments or {}).get("x-consumer-timeout") if queue is not None else None
        if argument is not None:  # the queue's own, in milliseconds (RabbitMQ >= 3.11.15)
            try:
                ct, where = float(argument) / 1000.0, f"x-consumer-timeout of queue {queue.name!r}"
            except (TypeError, ValueError):
                pass
        if not 0 < ct < math.inf:
            continue  # the timeout is off
        # With native delayed delivery a countdown waits in RabbitMQ's delay queues, not in the worker.
        countdown_held = not (native_delay and queue is not None and queue.exchange is not None
                              and queue.exchange.type != "direct")
        held = s.task_time_limit + (s.max_countdown if countdown_held else 0.0)
        if held < ct:
            continue
        bound = _countdown_bound_for(ct, s.task_time_limit)
        if not countdown_held or bound is None:
            return [ConfigProblem(
                where_set("task_time_limit", app),
                f"is {_fmt(s.task_time_limit)}, too close to RabbitMQ's consumer_timeout ({_fmt(ct)}, {where}): "
                "a worker holds a message unacknowledged while it runs, and when one holds a message longer "
                f"than that RabbitMQ closes its channel: {_STOPS} lower the time limit or raise consumer_timeout",
                ERROR,
            )]
        vt = (f"{_fmt(s.visibility_timeout)}" if s.visibility_timeout is not None
              else f"unset, {_fmt(REDIS_DEFAULT_VISIBILITY_TIMEOUT)} assumed")
        return [ConfigProblem(
            _countdown_source(app),
            f"bounds cio_celery's countdowns, which on RabbitMQ a worker holds unacknowledged until they are "
            f"due: up to {_fmt(s.max_countdown)} (90 % of it: {vt}) plus one attempt of up to "
            f"{_fmt(s.task_time_limit)} (CIO_TASK_TIME_LIMIT) is {_fmt(held)}, not below RabbitMQ's "
            f"consumer_timeout ({_fmt(ct)}, {where}), after which RabbitMQ closes the worker's channel: {_STOPS} "
            f"set it to {_fmt(bound)} or less "
            f"({_recommended_call('amqp')} does), or raise consumer_timeout and declare it",
            ERROR,
        )]
    return []


def _check_amqp(app: Any, s: Settings | None) -> list[ConfigProblem]:
    """RabbitMQ: publisher confirms, durable queues and persistent messages, quorum queues, and the
    consumer timeout against the longest countdown."""
    problems = _check_confirms(app)
    try:
        queues = _cio_queue_declarations(app, s)
    except Exception:  # noqa: BLE001 - a task_queues Celery cannot read is Celery's to report
        queues = []
    problems += _check_durability(app.conf, queues)
    quorum = [q for q in queues if _queue_type(q) == "quorum"]
    problems += _check_quorum(app.conf, quorum)
    native_delay = bool(quorum) and _celery_has_quorum_support() and bool(
        app.conf.get("worker_detect_quorum_queues", True))
    if s is not None:
        problems += _check_consumer_timeout(app, s, queues, native_delay)
    return problems


def _check_masking(app: Any) -> list[ConfigProblem]:
    """Celery's printouts (``celery report``, ``inspect conf``, Flower) must not show the store URL."""
    from .settings import CELERY_HIDDEN_KEYS, mask_in_celery_reports

    if mask_in_celery_reports():
        return []
    try:
        table = app.conf.table(with_defaults=False, censored=False)
        keys = sorted(k for k, v in table.items() if v and re.search(CELERY_HIDDEN_KEYS, str(k), re.I))
    except Exception:  # noqa: BLE001 - an unreadable conf: nothing to name
        keys = []
    if not keys:
        return []
    variables = ", ".join(_env(k.lower().split("cio_", 1)[-1]) for k in keys)
    return [ConfigProblem(
        ", ".join(keys),
        "Celery's configuration printouts (celery report, inspect conf, Flower) would show it unmasked: this "
        "Celery's celery.app.utils.HIDDEN_SETTINGS could not be extended; set it in the environment "
        f"({variables}) instead of the Celery configuration, or use a Celery version cio_celery supports",
        WARNING,
    )]


def _check_countdowns(s: Settings, kind: str = "redis") -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    longest = s.max_countdown
    below = ("RabbitMQ's consumer_timeout through CIO_VISIBILITY_TIMEOUT" if kind == "amqp"
             else "the broker's visibility timeout")
    for name, what in (("retry_backoff_max", "backoff waits"), ("retry_after_max", "Retry-After waits")):
        value = float(getattr(s, name))
        if value > longest:
            problems.append(ConfigProblem(
                _env(name),
                f"is {_fmt(value)}, more than the longest countdown ({_fmt(longest)}, kept below {below}): "
                f"{what} are clipped to {_fmt(longest)}",
                WARNING,
            ))
    return problems


def _check_queues(app: Any, s: Settings, queues: Collection[str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    consumed = set(queues)
    fix = f"start workers with -Q {','.join(s.queues)}"
    # With task_routes the operations go where the routes send them (tasks.CioTask.apply_async).
    if not app.conf.task_routes and s.queue not in consumed:
        problems.append(ConfigProblem(
            _env("queue"),
            f"queue {s.queue!r} is not consumed by this worker: it runs none of the operations sent there; {fix}",
            WARNING,
        ))
    if not app.conf.task_routes and s.send_queue not in consumed and s.send_queue != s.queue:
        problems.append(ConfigProblem(
            _env("send_queue"),
            f"queue {s.send_queue!r} is not consumed by this worker: it runs none of the transactional sends "
            f"(send_email, send_push, send_sms) sent there; {fix}",
            WARNING,
        ))
    if s.fallback_queue not in consumed:
        problems.append(ConfigProblem(
            _env("fallback_queue"),
            f"queue {s.fallback_queue!r} is not consumed by this worker: operations parked during an outage "
            f"are released to it (by any worker's releaser) and wait there until a worker consumes it; {fix}",
            WARNING,
        ))
    return problems


def _config_value(store: redis.Redis, name: str) -> str | None:
    """One ``CONFIG GET`` value as text; ``None`` when the server does not say."""
    reply: Any = store.config_get(name)
    for key, value in dict(reply).items():
        k = key.decode() if isinstance(key, bytes) else str(key)
        if k.lower() == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _check_store(store: redis.Redis) -> list[ConfigProblem]:
    setting = _env("redis_url")
    try:
        appendonly = _config_value(store, "appendonly")
        policy = _config_value(store, "maxmemory-policy")
    except redis.ResponseError:
        return []  # CONFIG is disabled or not permitted (managed Redis): nothing to inspect
    except (redis.RedisError, OSError) as exc:
        return [ConfigProblem(
            setting, f"the store could not be inspected ({type(exc).__name__}); its persistence was not checked",
            WARNING,
        )]
    problems: list[ConfigProblem] = []
    if appendonly is not None and appendonly.lower() != "yes":
        problems.append(ConfigProblem(
            setting,
            f"the store's Redis has appendonly {appendonly}: a Redis restart loses idempotency claims, breaker "
            "state, parked operations and dead letters written since the last snapshot",
            WARNING,
        ))
    if policy is not None and policy.lower() != "noeviction":
        problems.append(ConfigProblem(
            setting,
            f"the store's Redis has maxmemory-policy {policy}; set noeviction: an evicted idempotency claim "
            "lets an operation be sent twice, and evicted parked operations or dead letters are lost",
            ERROR,
        ))
    return problems


def check_configuration(
    app: Any,
    settings: Settings | None = None,
    *,
    consumer_queues: Collection[str] | None = None,
    store: redis.Redis | None = None,
) -> list[ConfigProblem]:
    """What in ``app``'s configuration breaks a cio_celery guarantee; an empty list when nothing does.

    It reads ``app.conf`` and the app's cio_celery tasks (as Celery resolved them: class
    attributes, ``task_*`` settings, ``task_annotations``), and registers the tasks (finalises
    the app) if that was not done yet. ``settings`` defaults to the app's (``settings_for_app``);
    ``consumer_queues`` (the queues a worker consumes) turns on the queue checks; ``store``
    (a client of the store's Redis) turns on the persistence checks, skipped when ``CONFIG``
    is disabled. Nothing is written, nothing is raised for a bad setting: it is reported.
    """
    problems: list[ConfigProblem] = []
    if settings is None:
        try:
            settings = settings_for_app(app)
        except ConfigurationError as exc:
            problems.append(ConfigProblem(where_set(exc.setting, app), exc.problem, ERROR))
    problems += _check_transport(app)
    kind = _broker_kind(app)
    problems += _check_worker_settings(app.conf, kind)
    problems += _check_tasks(app)
    problems += _check_masking(app)
    if kind == "amqp":
        problems += _check_amqp(app, settings)
    if settings is not None:
        if kind == "redis":
            problems += _check_visibility_timeout(app, settings)
        problems += _check_countdowns(settings, kind)
        if consumer_queues is not None:
            problems += _check_queues(app, settings, consumer_queues)
    if store is not None:
        problems += _check_store(store)
    return problems


def log_configuration_problems(problems: Iterable[ConfigProblem], logger: logging.Logger | None = None) -> None:
    """Log each problem on ``cio_celery.checks``: errors at ERROR, warnings at WARNING."""
    log = logger if logger is not None else logging.getLogger("cio_celery.checks")
    for p in problems:
        level = logging.ERROR if p.severity == ERROR else logging.WARNING
        log.log(level, "cio_celery configuration: %s", p, extra={
            "cio_event": "configuration_problem", "cio_setting": p.setting, "cio_severity": p.severity,
        })


def consumer_queues(consumer: Any) -> list[str] | None:
    """The names of the queues a worker's consumer consumes (``Consumer.task_consumer.queues``)."""
    task_consumer = getattr(consumer, "task_consumer", None)
    queues = getattr(task_consumer, "queues", None)
    if queues is None:
        return None
    return [str(q.name) for q in queues]


# Health problems a worker logs at start (the queue and configuration ones come from check_configuration).
_START_PROBLEMS = ("track_credentials_missing", "app_credentials_missing", "spool_stale", "broker_unreachable",
                   "broker_publish_failing")


def _health_problems(app: Any, settings: Settings) -> list[ConfigProblem]:
    from .health import health_report  # late: health imports this module

    report = health_report(app, settings, check_workers=False)
    out: list[ConfigProblem] = []
    for p in report.problems:
        if p.name in _START_PROBLEMS:
            severity = ERROR if p.name.startswith("track_") or p.name.startswith("broker_") else WARNING
            out.append(ConfigProblem(p.setting or p.name, f"{p.name}: {p.message}; fix: {p.fix}", severity))
    return out


def check_worker(sender: Any = None, **kwargs: Any) -> list[ConfigProblem]:
    """A ``worker_ready`` handler: check the worker's app, queues, store, credentials, spool and
    broker, and log each problem with its fix.

    ``sender`` is the worker's consumer. An unreachable store is reported, not raised; this
    never raises at all (an unexpected error is logged and an empty list returned).
    """
    try:
        app = getattr(sender, "app", None)
        if app is None:
            return []
        store: redis.Redis | None = None
        settings: Settings | None = None
        try:
            settings = settings_for_app(app)
        except ConfigurationError:
            pass  # check_configuration reports it
        if settings is not None and settings.redis_url:
            try:
                store = redis_for(settings)
            except Exception:  # noqa: BLE001, S110 - no store client: the store checks are skipped
                pass
        problems = check_configuration(app, settings, consumer_queues=consumer_queues(sender), store=store)
        if settings is not None:
            problems += _health_problems(app, settings)
        log_configuration_problems(problems)
        return problems
    except Exception as exc:  # noqa: BLE001 - a check must never stop a worker
        logger.error("cio_celery configuration: the check failed (%s)", type(exc).__name__)
        return []


def _cio_status(state: Any, **_: Any) -> dict[str, Any]:
    """The ``cio_status`` remote command: the queues this worker consumes and the credentials it lacks.

    :func:`cio_celery.health.health_report` broadcasts it: Redis counts no consumers, and only the
    workers know their own credentials. It names variables, never their values.
    """
    answer: dict[str, Any] = {"queues": consumer_queues(getattr(state, "consumer", None)) or [], "missing": None}
    try:
        answer["missing"] = credential_gaps(settings_for_app(state.app))
    except Exception as exc:  # noqa: BLE001 - answered as such, never raised in the worker
        answer["configuration_error"] = type(exc).__name__
    return answer


def _register_remote_command() -> None:
    """Every worker that imports cio_celery answers ``cio_status`` (registered before it consumes)."""
    try:
        from celery.worker.control import inspect_command

        inspect_command(name=REMOTE_COMMAND)(_cio_status)
    except Exception as exc:  # noqa: BLE001 - health then falls back to active_queues
        logger.warning("cio_celery: the %s remote command is not available (%s)", REMOTE_COMMAND, type(exc).__name__)


_register_remote_command()
