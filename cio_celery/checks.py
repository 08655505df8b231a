"""Start-up checks: the Celery and Redis settings that cio_celery's guarantees rest on.

:func:`recommended_celery_config` gives the Celery settings to apply; :func:`check_configuration`
inspects an app (and optionally the worker's queues and the store's Redis) and lists what
breaks a guarantee; :func:`check_worker` does both from a ``worker_ready`` signal and logs
the result. Messages name settings and values, never a URL or a credential.
"""

from __future__ import annotations

import logging
import os
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


def recommended_celery_config(
    settings: Settings | None = None, *, visibility_timeout: float | None = None
) -> dict[str, Any]:
    """The Celery settings cio_celery needs, for ``app.conf.update(recommended_celery_config())``.

    - ``task_acks_late``: acknowledge a message after the delivery, so a dead worker's operation is redelivered.
    - ``worker_prefetch_multiplier`` 1: no operation waits, held unacknowledged, behind a slow delivery.
    - ``task_reject_on_worker_lost``: a killed worker process requeues its operation instead of acknowledging it.
    - ``worker_cancel_long_running_tasks_on_connection_loss`` off: Celery would terminate the pool process of
      every delivery whose ack failed with the connection, even one that had finished (the process is then
      running another delivery); the chaos suite saw it crash the worker. A delivery that keeps running
      while its message is redelivered is safe: the copy finds the claim held, then done.
    - ``broker_connection_retry_on_startup``: a worker started while the broker is down waits for it.
    - ``broker_transport_options`` (Redis transport; ignored keys elsewhere):

      - ``visibility_timeout``: seconds before an unacknowledged message is redelivered; it must outlast
        the longest countdown plus one attempt (default: ``CIO_VISIBILITY_TIMEOUT``, else
        ``max(3600, 10 x (task_time_limit + timeout))``; 3600 is Redis' default, which ``max_countdown`` assumes).
      - ``socket_timeout`` 5: a publish or ack on a dead connection fails instead of hanging.
      - ``socket_connect_timeout`` 5: connecting to an unreachable broker fails within 5 s.
      - ``unacked_restore_interval`` 1.0: seconds between kombu's sweeps for abandoned unacked messages.
      - ``unacked_restore_throttle`` 1: every sweep scans (kombu's default scans every 10th: one per 100 s).

    ``broker_transport_options`` replaces the app's whole mapping: merge your own keys (a
    Sentinel ``master_name`` ...) into it. Without ``settings`` it reads only
    ``CIO_VISIBILITY_TIMEOUT``, ``CIO_TASK_TIME_LIMIT`` and ``CIO_TIMEOUT`` from the environment,
    and never raises: a bad value there (or in any other setting) is reported by the checks,
    naming the variable, not by a traceback at import.
    """
    s = _lenient_settings() if settings is None else settings
    if visibility_timeout is None:
        if s.visibility_timeout is not None:
            visibility_timeout = s.visibility_timeout
        else:
            # max_countdown is 90 % of it (for >= 600 s): the remaining 10 % covers one attempt.
            visibility_timeout = max(REDIS_DEFAULT_VISIBILITY_TIMEOUT, 10.0 * (s.task_time_limit + s.timeout))
    return {
        "task_acks_late": True,
        "worker_prefetch_multiplier": 1,
        "task_reject_on_worker_lost": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": float(visibility_timeout),
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            "unacked_restore_interval": 1.0,
            "unacked_restore_throttle": 1,
        },
    }


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


def _check_worker_settings(conf: Any) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    multiplier = conf.worker_prefetch_multiplier
    # worker_disable_prefetch (Celery >= 5.6, Redis only) fetches only what the pool can run.
    if not conf.get("worker_disable_prefetch", False) and multiplier != 1:
        shown = f"{multiplier} (unlimited)" if multiplier == 0 else str(multiplier)
        problems.append(ConfigProblem(
            "worker_prefetch_multiplier",
            f"is {shown}; set it to 1 (app.conf.update(recommended_celery_config()) does): a prefetched "
            "operation waits behind a slow delivery, and with acks_late it is held unacknowledged all the while",
            WARNING,
        ))
    if conf.worker_cancel_long_running_tasks_on_connection_loss:
        problems.append(ConfigProblem(
            "worker_cancel_long_running_tasks_on_connection_loss",
            "is on: after a broker connection loss Celery terminates the pool process of every delivery whose "
            "ack failed, even one that had finished and whose process runs another delivery by then (in the "
            "chaos suite this crashed the worker); the idempotency claims already make a delivery that keeps "
            "running while its message is redelivered safe; app.conf.update(recommended_celery_config()) "
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


def _broker_is_redis(app: Any) -> bool:
    """Whether the app's broker transport is kombu's Redis transport (or Sentinel), without connecting."""
    try:
        from kombu.transport import resolve_transport
        from kombu.transport.redis import Transport as RedisTransport

        conn = app.connection_for_write()
        try:
            transport = resolve_transport(conn.transport_cls)
        finally:
            conn.release()
        return isinstance(transport, type) and issubclass(transport, RedisTransport)
    except Exception:  # noqa: BLE001 - an unknown transport is not Redis
        return False


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


def _check_countdowns(s: Settings) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    longest = s.max_countdown
    for name, what in (("retry_backoff_max", "backoff waits"), ("retry_after_max", "Retry-After waits")):
        value = float(getattr(s, name))
        if value > longest:
            problems.append(ConfigProblem(
                _env(name),
                f"is {_fmt(value)}, more than the longest countdown ({_fmt(longest)}, kept below the broker's "
                f"visibility timeout): {what} are clipped to {_fmt(longest)}",
                WARNING,
            ))
    return problems


def _check_queues(app: Any, s: Settings, queues: Collection[str]) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    consumed = set(queues)
    # With task_routes the operations go where the routes send them (tasks.CioTask.apply_async).
    if not app.conf.task_routes and s.queue not in consumed:
        problems.append(ConfigProblem(
            _env("queue"),
            f"queue {s.queue!r} is not consumed by this worker: it runs none of the operations sent there; "
            f"start workers with -Q {s.queue},{s.fallback_queue}",
            WARNING,
        ))
    if s.fallback_queue not in consumed:
        problems.append(ConfigProblem(
            _env("fallback_queue"),
            f"queue {s.fallback_queue!r} is not consumed by this worker: operations parked during an outage "
            "are released to it (by any worker's releaser) and wait there until a worker consumes it; "
            f"start workers with -Q {s.queue},{s.fallback_queue}",
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
    problems += _check_worker_settings(app.conf)
    problems += _check_tasks(app)
    if settings is not None:
        problems += _check_visibility_timeout(app, settings)
        problems += _check_countdowns(settings)
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
