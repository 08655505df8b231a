"""Start-up checks: each problem is reported under the setting to change, and nothing leaks a URL."""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue
from kombu.transport.redis import Channel

import cio_celery.tasks  # noqa: F401  (registers the shared cio_celery tasks on every app)
from cio_celery.checks import (
    ConfigProblem,
    check_configuration,
    check_worker,
    log_configuration_problems,
    recommended_celery_config,
)
from cio_celery.settings import Settings

PASSWORD = "s3cretpw"
QUEUES = ("cio", "cio.send", "cio.fallback")


def make_app(broker: str, **conf: Any) -> Celery:
    app = Celery("checks-test", set_as_current=False)
    app.conf.update(broker_url=broker, **conf)
    return app


@pytest.fixture()
def good_app(broker_url: str, store_url: str) -> Celery:
    return make_app(broker_url, cio_redis_url=store_url, **recommended_celery_config(Settings()))


@pytest.fixture()
def store_client(store_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture()
def redis_config(store_client: redis.Redis) -> Iterator[Callable[[str, str], None]]:
    """Set a server setting for one test; the old value is restored after it."""
    saved: dict[str, str] = {}

    def set_config(name: str, value: str) -> None:
        try:
            old = str(store_client.config_get(name)[name])
        except redis.ResponseError:
            pytest.skip("CONFIG is disabled on the test Redis")
        saved.setdefault(name, old)
        store_client.config_set(name, value)

    yield set_config
    for name, value in saved.items():
        store_client.config_set(name, value)


def by_setting(problems: list[ConfigProblem], setting: str) -> list[ConfigProblem]:
    return [p for p in problems if p.setting == setting]


def only(problems: list[ConfigProblem], setting: str, severity: str) -> ConfigProblem:
    found = by_setting(problems, setting)
    assert len(found) == 1, problems
    assert found[0].severity == severity
    return found[0]


# -- recommended_celery_config -------------------------------------------------------------


def test_recommended_config_values() -> None:
    conf = recommended_celery_config(Settings())
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"] is True
    assert "task_acks_on_failure_or_timeout" not in conf  # the tasks set their own (never ack a timeout)
    assert conf["worker_cancel_long_running_tasks_on_connection_loss"] is False
    assert conf["broker_connection_retry_on_startup"] is True
    expected = {
        "visibility_timeout": 3600.0,
        "socket_timeout": 5,
        "socket_connect_timeout": 5,
        "unacked_restore_interval": 1.0,  # kombu 5.7+ only
        "unacked_restore_throttle": 1,  # kombu 5.7+ only
    }
    known = set(Channel.from_transport_options)
    assert conf["broker_transport_options"] == {k: v for k, v in expected.items() if k in known}
    # Every transport option is one kombu's Redis channel reads (unknown ones are ignored silently).
    assert set(conf["broker_transport_options"]) <= set(Channel.from_transport_options)


def test_recommended_visibility_timeout_follows_the_settings() -> None:
    assert recommended_celery_config(Settings(visibility_timeout=900))["broker_transport_options"][
        "visibility_timeout"] == 900.0
    assert recommended_celery_config(Settings(), visibility_timeout=120)["broker_transport_options"][
        "visibility_timeout"] == 120.0
    # A long time limit needs a longer timeout than Redis' default to keep one attempt's margin.
    long = Settings(task_time_limit=600, timeout=30)
    vt = recommended_celery_config(long)["broker_transport_options"]["visibility_timeout"]
    assert vt == 6300.0 and vt - long.max_countdown >= long.task_time_limit + long.timeout


def test_recommended_config_reports_no_problems(
    good_app: Celery, store_client: redis.Redis, redis_config: Callable[[str, str], None]
) -> None:
    redis_config("appendonly", "yes")
    redis_config("maxmemory-policy", "noeviction")
    assert check_configuration(good_app, consumer_queues=QUEUES, store=store_client) == []


def test_problem_text() -> None:
    p = ConfigProblem("worker_prefetch_multiplier", "is 4; set it to 1", "warning")
    assert str(p) == "worker_prefetch_multiplier: is 4; set it to 1 (warning)"


# -- one test per problem -------------------------------------------------------------------


def test_prefetch_multiplier(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()), "worker_prefetch_multiplier": 4}
    p = only(check_configuration(make_app(broker_url, **conf)), "worker_prefetch_multiplier", "warning")
    assert p.problem.startswith("is 4;")
    conf["worker_prefetch_multiplier"] = 0
    p = only(check_configuration(make_app(broker_url, **conf)), "worker_prefetch_multiplier", "warning")
    assert "unlimited" in p.problem


def test_task_not_acks_late(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()),
            "task_annotations": {"cio_celery.identify": {"acks_late": False}}}
    problems = check_configuration(make_app(broker_url, **conf))
    p = only(problems, "task_acks_late", "error")
    assert "cio_celery.identify" in p.problem and "cio_celery.track" not in p.problem
    assert by_setting(problems, "task_reject_on_worker_lost") == []


def test_task_not_reject_on_worker_lost(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()), "task_annotations": {"*": {"reject_on_worker_lost": False}}}
    p = only(check_configuration(make_app(broker_url, **conf)), "task_reject_on_worker_lost", "error")
    assert "all 18 cio_celery tasks" in p.problem


def test_task_acked_on_timeout(broker_url: str) -> None:
    # The tasks requeue a delivery killed by the hard time limit; an annotation can undo that.
    base = recommended_celery_config(Settings())
    assert by_setting(check_configuration(make_app(broker_url, **base, task_acks_on_failure_or_timeout=True)),
                      "task_acks_on_timeout") == []
    conf = {**base, "task_annotations": {"cio_celery.send_email": {"acks_on_timeout": True}}}
    p = only(check_configuration(make_app(broker_url, **conf)), "task_acks_on_timeout", "error")
    assert "cio_celery.send_email" in p.problem and "hard time limit" in p.problem


def test_visibility_timeout_shorter_than_one_attempt(broker_url: str) -> None:
    conf = recommended_celery_config(Settings(), visibility_timeout=30)
    p = only(check_configuration(make_app(broker_url, **conf)), "broker_transport_options.visibility_timeout",
             "error")
    assert "30 s" in p.problem and "70 s" in p.problem  # task_time_limit 60 + timeout 10


def test_visibility_timeout_mismatch(broker_url: str) -> None:
    app = make_app(broker_url, **recommended_celery_config(Settings(), visibility_timeout=1000))
    # CIO_VISIBILITY_TIMEOUT set to another value than the broker's.
    p = only(check_configuration(app, Settings(visibility_timeout=3600)), "CIO_VISIBILITY_TIMEOUT", "error")
    assert "mismatch" in p.problem and "run twice" in p.problem
    # Unset: max_countdown assumes Redis' default 3600 s, longer than the broker's 1000 s.
    p = only(check_configuration(app, Settings()), "broker_transport_options.visibility_timeout", "error")
    assert "mismatch" in p.problem
    # From the app (settings_for_app reads the broker's value): consistent, nothing reported.
    assert check_configuration(app) == []


def test_time_limit_longer_than_the_visibility_margin(broker_url: str) -> None:
    settings = Settings(task_time_limit=400)
    app = make_app(broker_url, **recommended_celery_config(settings, visibility_timeout=3600))
    p = only(check_configuration(app, settings), "CIO_TASK_TIME_LIMIT", "error")
    assert "3240 s" in p.problem  # max_countdown: 90 % of 3600


def test_backoff_longer_than_the_longest_countdown(broker_url: str) -> None:
    app = make_app(broker_url, **recommended_celery_config(Settings(), visibility_timeout=600))
    problems = check_configuration(app)  # max_countdown 540 s: below both defaults (600 s, 900 s)
    assert "540 s" in only(problems, "CIO_RETRY_BACKOFF_MAX", "warning").problem
    assert "clipped" in only(problems, "CIO_RETRY_AFTER_MAX", "warning").problem


def test_cancelling_running_deliveries_on_connection_loss_is_flagged(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()), "worker_cancel_long_running_tasks_on_connection_loss": True}
    only(check_configuration(make_app(broker_url, **conf)),
         "worker_cancel_long_running_tasks_on_connection_loss", "warning")


def test_queues_not_consumed(good_app: Celery) -> None:
    problems = check_configuration(good_app, consumer_queues=["celery"])
    assert "'cio'" in only(problems, "CIO_QUEUE", "warning").problem
    assert "'cio.fallback'" in only(problems, "CIO_FALLBACK_QUEUE", "warning").problem
    assert "transactional sends" in only(problems, "CIO_SEND_QUEUE", "warning").problem
    assert "-Q cio,cio.send,cio.fallback" in only(problems, "CIO_SEND_QUEUE", "warning").problem
    assert by_setting(check_configuration(good_app, consumer_queues=["cio", "cio.fallback"]), "CIO_SEND_QUEUE")
    assert check_configuration(good_app, consumer_queues=QUEUES) == []


def test_queue_check_defers_to_task_routes(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()), "task_routes": {"cio_celery.*": {"queue": "mail"}}}
    problems = check_configuration(make_app(broker_url, **conf), consumer_queues=["mail"])
    assert by_setting(problems, "CIO_QUEUE") == [] and by_setting(problems, "CIO_SEND_QUEUE") == []
    only(problems, "CIO_FALLBACK_QUEUE", "warning")  # released with an explicit queue, routes or not


def test_store_without_appendonly(
    good_app: Celery, store_client: redis.Redis, redis_config: Callable[[str, str], None]
) -> None:
    redis_config("appendonly", "no")
    p = only(check_configuration(good_app, store=store_client), "CIO_REDIS_URL", "warning")
    assert "appendonly no" in p.problem


def test_store_that_evicts(
    good_app: Celery, store_client: redis.Redis, redis_config: Callable[[str, str], None]
) -> None:
    redis_config("appendonly", "yes")
    redis_config("maxmemory-policy", "volatile-lru")
    p = only(check_configuration(good_app, store=store_client), "CIO_REDIS_URL", "error")
    assert "volatile-lru" in p.problem and "noeviction" in p.problem


def test_store_client_without_decoding(
    good_app: Celery, store_url: str, redis_config: Callable[[str, str], None]
) -> None:
    redis_config("appendonly", "no")
    client = redis.Redis.from_url(store_url)  # bytes replies, like the package's own client
    try:
        assert "appendonly no" in only(check_configuration(good_app, store=client), "CIO_REDIS_URL",
                                       "warning").problem
    finally:
        client.close()


def test_always_eager(broker_url: str) -> None:
    conf = {**recommended_celery_config(Settings()), "task_always_eager": True}
    only(check_configuration(make_app(broker_url, **conf)), "task_always_eager", "warning")


def test_invalid_cio_setting_is_reported_not_raised(broker_url: str) -> None:
    app = make_app(broker_url, cio_timeout=-1, **recommended_celery_config(Settings()))
    only(check_configuration(app), "cio_timeout", "error")  # named where it is set: the Celery conf


def test_visibility_checks_only_apply_to_redis() -> None:
    app = make_app(AMQP, **recommended_celery_config(Settings(), visibility_timeout=5, transport="amqp"))
    problems = check_configuration(app, Settings(visibility_timeout=5))
    # Only the clipped backoff and Retry-After (longer than the 1 s longest countdown) are reported.
    assert sorted(p.setting for p in problems) == ["CIO_RETRY_AFTER_MAX", "CIO_RETRY_BACKOFF_MAX"]
    redis_app = make_app("redis://127.0.0.1:1/0", **recommended_celery_config(Settings(), visibility_timeout=5))
    only(check_configuration(redis_app, Settings()), "broker_transport_options.visibility_timeout", "error")


# -- RabbitMQ (the amqp transport) ------------------------------------------------------------

AMQP = "amqp://guest@127.0.0.1:1//"  # nothing listens: the checks read the configuration only
CT = "broker_transport_options.consumer_timeout"
CONFIRM = "broker_transport_options.confirm_publish"


def amqp_app(*, transport_options: dict[str, Any] | None = None, **conf: Any) -> Celery:
    """An app on RabbitMQ with the recommended configuration, changed by ``conf``."""
    base = recommended_celery_config(Settings(), transport="amqp")
    if transport_options is not None:
        base["broker_transport_options"] = transport_options
    return make_app(AMQP, **{**base, **conf})


@pytest.mark.parametrize("transport", ["amqp", "pyamqp", "amqp://u:p@rabbit:5672//", "amqps://rabbit//",
                                       "pyamqp://a//;pyamqp://b//", "AMQP://rabbit//"])
def test_recommended_config_for_rabbitmq(transport: str) -> None:
    import amqp

    conf = recommended_celery_config(Settings(), transport=transport)
    assert conf["task_acks_late"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_reject_on_worker_lost"] is True
    assert conf["task_default_delivery_mode"] == "persistent"
    # No Redis options: publisher confirms, and the broker's consumer_timeout (RabbitMQ's default).
    assert conf["broker_transport_options"] == {"confirm_publish": True, "consumer_timeout": 1800.0}
    assert "confirm_publish" in inspect.signature(amqp.Connection).parameters
    # The countdown bound keeps a held countdown plus one attempt below consumer_timeout.
    assert conf["cio_visibility_timeout"] == 1800.0 - 60.0


def test_recommended_config_per_transport() -> None:
    redis_conf = recommended_celery_config(Settings())
    assert recommended_celery_config(Settings(), transport="redis://h:6379/0") == redis_conf
    assert recommended_celery_config(Settings(), transport="sentinel://h:26379") == redis_conf
    assert "visibility_timeout" in redis_conf["broker_transport_options"]
    other = recommended_celery_config(Settings(), transport="sqs://")
    assert "broker_transport_options" not in other and other["task_acks_late"] is True


@pytest.mark.parametrize(("consumer_timeout", "time_limit"), [(60, 5), (600, 60), (1800, 60), (1800, 300),
                                                              (7200, 60), (90, 88)])
def test_recommended_rabbitmq_config_passes_its_own_checks(consumer_timeout: float, time_limit: float) -> None:
    settings = Settings(task_time_limit=time_limit)
    conf = recommended_celery_config(settings, transport="amqp", consumer_timeout=consumer_timeout)
    app = make_app(AMQP, cio_task_time_limit=time_limit, **conf)
    problems = check_configuration(app, consumer_queues=QUEUES)
    # A short consumer_timeout clips the backoff (600 s) and Retry-After (900 s) caps: warned, not wrong.
    assert {p.setting for p in problems} <= {"CIO_RETRY_AFTER_MAX", "CIO_RETRY_BACKOFF_MAX"}, problems
    assert all(p.severity == "warning" for p in problems)
    # What the check compares: the longest countdown held, then one attempt, below consumer_timeout.
    s = Settings(task_time_limit=time_limit, visibility_timeout=conf["cio_visibility_timeout"])
    assert s.max_countdown + s.task_time_limit < consumer_timeout


def test_recommended_rabbitmq_config_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIO_TASK_TIME_LIMIT", "120")
    assert recommended_celery_config(transport="amqp")["cio_visibility_timeout"] == 1680.0
    monkeypatch.setenv("CIO_VISIBILITY_TIMEOUT", "900")  # the user's own bound is kept (and checked)
    assert recommended_celery_config(transport="amqp")["cio_visibility_timeout"] == 900.0
    assert recommended_celery_config(transport="amqp", visibility_timeout=10)["cio_visibility_timeout"] == 10.0


@pytest.mark.parametrize("consumer_timeout", ["abc", None, 0, float("inf"), -5])
def test_recommended_rabbitmq_config_never_raises(consumer_timeout: Any) -> None:
    conf = recommended_celery_config(transport="amqp", consumer_timeout=consumer_timeout)
    assert conf["broker_transport_options"]["confirm_publish"] is True
    if consumer_timeout in (0, float("inf"), -5):  # the timeout is off: no bound needed
        assert "cio_visibility_timeout" not in conf


def test_rabbitmq_without_publisher_confirms() -> None:
    app = amqp_app(transport_options={"consumer_timeout": 1800})
    p = only(check_configuration(app), CONFIRM, "error")
    assert "task_acks_late" in p.problem and "recommended_celery_config(transport='amqp')" in p.problem
    assert check_configuration(amqp_app(transport_options={"confirm_publish": True})) == []


def test_redis_checks_do_not_fire_on_rabbitmq_nor_rabbitmq_checks_on_redis(broker_url: str) -> None:
    # The Redis configuration on RabbitMQ: no visibility-timeout problem, but no confirms either.
    problems = check_configuration(make_app(AMQP, **recommended_celery_config(Settings(), visibility_timeout=1000)))
    assert [p.setting for p in problems] == [CONFIRM]
    # Celery ignores worker_disable_prefetch on RabbitMQ: a prefetch of 4 is still one.
    only(check_configuration(amqp_app(worker_prefetch_multiplier=4, worker_disable_prefetch=True)),
         "worker_prefetch_multiplier", "warning")
    redis_problems = check_configuration(make_app(broker_url, **recommended_celery_config(Settings()),
                                                  task_default_delivery_mode="transient"))
    assert redis_problems == []


def test_countdowns_longer_than_the_default_consumer_timeout() -> None:
    # The Redis recommendation on RabbitMQ: countdowns up to 3240 s, RabbitMQ's 30 min assumed.
    app = amqp_app(transport_options={"confirm_publish": True, "visibility_timeout": 3600.0},
                   cio_visibility_timeout=None)
    p = only(check_configuration(app), "broker_transport_options.visibility_timeout", "error")
    assert "3240 s" in p.problem and "3300 s" in p.problem and "1800 s, RabbitMQ's default" in p.problem
    assert "set it to 1740 s or less" in p.problem


def test_consumer_timeout_declared_by_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIO_VISIBILITY_TIMEOUT", "3600")
    app = amqp_app(cio_visibility_timeout=None,
                   transport_options={"confirm_publish": True, "consumer_timeout": 7200})
    assert check_configuration(app) == []  # 3240 + 60 s < 2 h
    app = amqp_app(cio_visibility_timeout=None, transport_options={"confirm_publish": True, "consumer_timeout": 600})
    p = only(check_configuration(app), "CIO_VISIBILITY_TIMEOUT", "error")
    assert "600 s, broker_transport_options['consumer_timeout']" in p.problem and "540 s or less" in p.problem
    app = amqp_app(cio_visibility_timeout=None, transport_options={"confirm_publish": True, "consumer_timeout": 0})
    assert check_configuration(app) == []  # RabbitMQ's timeout is off
    app = amqp_app(transport_options={"confirm_publish": True, "consumer_timeout": "30m"})
    assert "not a number" in only(check_configuration(app), CT, "error").problem


def test_consumer_timeout_of_the_queue_argument() -> None:
    # RabbitMQ >= 3.11.15 takes a queue's own x-consumer-timeout (milliseconds) over the node's.
    queues = [Queue("cio", queue_arguments={"x-consumer-timeout": 600_000}), Queue("cio.fallback")]
    p = only(check_configuration(amqp_app(task_queues=queues)), "cio_visibility_timeout", "error")
    assert "x-consumer-timeout of queue 'cio'" in p.problem and "1740 s" in p.problem
    queues = [Queue("cio", queue_arguments={"x-consumer-timeout": 7_200_000}), Queue("cio.fallback")]
    p = only(check_configuration(amqp_app(task_queues=queues, cio_visibility_timeout=3600)),
             "cio_visibility_timeout", "error")
    assert "(1800 s, broker_transport_options['consumer_timeout'])" in p.problem  # the fallback queue: the node's


def test_time_limit_too_close_to_the_consumer_timeout() -> None:
    app = amqp_app(cio_task_time_limit=1799)
    p = only(check_configuration(app), "cio_task_time_limit", "error")
    assert "1799 s" in p.problem and "consumer_timeout (1800 s" in p.problem


def test_transient_messages_and_queues_on_rabbitmq() -> None:
    p = only(check_configuration(amqp_app(task_default_delivery_mode="transient")), "task_default_delivery_mode",
             "error")
    assert "restart loses" in p.problem
    queues = [Queue("cio", durable=False), Queue("cio.fallback", auto_delete=True)]
    problems = by_setting(check_configuration(amqp_app(task_queues=queues)), "task_queues")
    assert len(problems) == 2 and all(p.severity == "error" for p in problems)
    assert "'cio' is not durable" in problems[0].problem and "'cio.fallback' is auto_delete" in problems[1].problem
    queues = [Queue("cio", Exchange("cio", durable=False), routing_key="cio"), Queue("cio.fallback")]
    p = only(check_configuration(amqp_app(task_queues=queues)), "task_queues", "error")
    assert "non-durable exchange 'cio'" in p.problem


def test_quorum_queues_need_native_delayed_delivery() -> None:
    if not hasattr(Celery().conf, "task_create_missing_queue_type"):
        pytest.skip("Celery without task_create_missing_queue_type")
    quorum = {"task_create_missing_queue_type": "quorum"}
    p = only(check_configuration(amqp_app(**quorum)), "task_queues", "warning")
    assert "queues 'cio', 'cio.send', 'cio.fallback' are bound to a direct exchange" in p.problem
    # On topic exchanges, countdowns wait in RabbitMQ's delay queues: only one attempt is held.
    topic = {**quorum, "task_create_missing_queue_exchange_type": "topic"}
    assert check_configuration(amqp_app(**topic)) == []
    assert check_configuration(amqp_app(**topic, cio_visibility_timeout=36000)) == []
    p = only(check_configuration(amqp_app(**topic, worker_detect_quorum_queues=False)),
             "worker_detect_quorum_queues", "error")
    assert "global QoS" in p.problem
    queues = [Queue("cio", Exchange("cio", type="topic"), routing_key="cio",
                    queue_arguments={"x-queue-type": "quorum"}), Queue("cio.fallback")]
    assert check_configuration(amqp_app(task_queues=queues)) == []


def test_a_store_url_celery_would_print_unmasked(monkeypatch: pytest.MonkeyPatch, broker_url: str,
                                                 store_url: str) -> None:
    import celery.app.utils

    app = make_app(broker_url, cio_redis_url=f"redis://:{PASSWORD}@127.0.0.1:1/1",
                   **recommended_celery_config(Settings()))
    assert by_setting(check_configuration(app, Settings()), "cio_redis_url") == []  # masked: nothing to say
    # A Celery whose HIDDEN_SETTINGS cio_celery cannot extend.
    monkeypatch.setattr(celery.app.utils, "HIDDEN_SETTINGS", "API|TOKEN|KEY|SECRET|PASS")
    p = only(check_configuration(app, Settings()), "cio_redis_url", "warning")
    assert "unmasked" in p.problem and "CIO_REDIS_URL" in p.problem and PASSWORD not in p.problem
    # Nothing to print: no problem.
    assert by_setting(check_configuration(make_app(broker_url), Settings()), "cio_redis_url") == []


# -- secrets, logging, the worker handler ------------------------------------------------------


def test_no_message_contains_the_broker_password(caplog: pytest.LogCaptureFixture) -> None:
    broker = f"redis://:{PASSWORD}@127.0.0.1:1/0"
    # Everything wrong; the store (derived from the broker URL) is unreachable.
    app = make_app(broker, worker_prefetch_multiplier=8, task_always_eager=True,
                   broker_transport_options={"visibility_timeout": 20},
                   task_annotations={"*": {"acks_late": False, "reject_on_worker_lost": False}})
    caplog.set_level(logging.DEBUG)
    problems = check_worker(SimpleNamespace(app=app, task_consumer=SimpleNamespace(queues=[Queue("x")])))
    assert len(problems) >= 8
    text = "\n".join([*map(str, problems), *map(repr, problems), caplog.text])
    assert PASSWORD not in text and "127.0.0.1:1" not in text


def test_log_configuration_problems(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="cio_celery.checks")
    log_configuration_problems([ConfigProblem("a", "bad", "error"), ConfigProblem("b", "meh", "warning")])
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("cio_celery.checks", logging.ERROR, "cio_celery configuration: a: bad (error)"),
        ("cio_celery.checks", logging.WARNING, "cio_celery configuration: b: meh (warning)"),
    ]
    other = logging.getLogger("checks-test")
    caplog.set_level(logging.DEBUG, logger="checks-test")  # an earlier worker may have raised root's level
    log_configuration_problems([ConfigProblem("c", "x", "warning")], logger=other)
    assert caplog.records[-1].name == "checks-test"


def test_check_worker_returns_and_logs_problems(broker_url: str, store_url: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    app = make_app(broker_url, cio_redis_url=store_url, worker_prefetch_multiplier=4)
    consumer = SimpleNamespace(app=app, task_consumer=SimpleNamespace(queues=[Queue(q) for q in QUEUES]))
    caplog.set_level(logging.WARNING, logger="cio_celery.checks")
    problems = check_worker(consumer)
    only(problems, "worker_prefetch_multiplier", "warning")
    assert by_setting(problems, "CIO_QUEUE") == [] and by_setting(problems, "CIO_FALLBACK_QUEUE") == []
    logged = [r.getMessage() for r in caplog.records if r.name == "cio_celery.checks"]
    assert logged == [f"cio_celery configuration: {p}" for p in problems]
    # Without a task consumer the queue checks are skipped.
    assert by_setting(check_worker(SimpleNamespace(app=app)), "CIO_QUEUE") == []


def test_check_worker_with_the_store_down(broker_url: str) -> None:
    app = make_app(broker_url, cio_redis_url="redis://127.0.0.1:1/0", **recommended_celery_config(Settings()))
    problems = check_worker(SimpleNamespace(app=app))
    p = only(problems, "CIO_REDIS_URL", "warning")
    assert "ConnectionError" in p.problem


def test_check_worker_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        @property
        def app(self) -> Any:
            raise RuntimeError("boom")

    caplog.set_level(logging.ERROR, logger="cio_celery.checks")
    assert check_worker(Broken()) == []
    assert "the check failed (RuntimeError)" in caplog.text
    assert check_worker() == [] and check_worker(object()) == []


def test_a_real_worker_warns_at_start(tmp_path: Any, redis_base_url: str, store_url: str,
                                      fake_cio_session: Any) -> None:
    """``celery worker`` (a subprocess) runs the checks at worker_ready and logs each problem."""
    from tests.workers import WorkerProcess, worker_env

    broker = f"{redis_base_url}/5"  # its own broker db: it must not take other tests' messages
    env = worker_env(fake_cio_session, broker, store_url, CIO_TEST_PREFETCH="4")
    worker = WorkerProcess(env, concurrency=1, name="checks").start(broker)
    try:
        deadline = time.monotonic() + 20
        while "cio_celery configuration" not in worker.tail(200) and time.monotonic() < deadline:
            time.sleep(0.1)
        log = worker.tail(200)
    finally:
        worker.stop()
        redis.Redis.from_url(broker).flushdb()
    assert "cio_celery configuration: worker_prefetch_multiplier: is 4" in log
    # It consumes the operations' queue and the fallback queue: neither is reported.
    assert "CIO_QUEUE" not in log and "CIO_FALLBACK_QUEUE" not in log


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CIO_TIMEOUT", "abc"), ("CIO_REDIS_URL", "http://user:pw@example.invalid/0"), ("CIO_REGION", "mars"),
     ("CIO_TASK_TIME_LIMIT", "soon"), ("CIO_MAX_RETRIES", "-1")],
)
def test_recommended_config_never_raises_on_the_environment(
    monkeypatch: pytest.MonkeyPatch, broker_url: str, variable: str, value: str
) -> None:
    """A project's celery.py calls it at import: a bad value must reach the checks, not a traceback."""
    monkeypatch.setenv(variable, value)
    config = recommended_celery_config()
    assert config["broker_transport_options"]["visibility_timeout"] == 3600.0  # the defaults' figure
    # The checks then name the variable that was set.
    problems = check_configuration(make_app(broker_url, **config))
    assert [p.setting for p in problems if p.severity == "error"] == [variable], problems


def test_recommended_config_still_follows_good_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIO_VISIBILITY_TIMEOUT", "7200")
    monkeypatch.setenv("CIO_TIMEOUT", "abc")  # ignored here, reported by the checks
    assert recommended_celery_config()["broker_transport_options"]["visibility_timeout"] == 7200.0


def test_where_set_names_the_source_of_a_value(monkeypatch: pytest.MonkeyPatch, broker_url: str) -> None:
    from cio_celery.checks import where_set

    app = make_app(broker_url, cio_timeout=5)
    monkeypatch.delenv("CIO_TIMEOUT", raising=False)
    assert where_set("timeout", app) == "cio_timeout"
    assert where_set("celery conf cio.timeout", app) == "cio_timeout"
    monkeypatch.setenv("CIO_TIMEOUT", "5")
    assert where_set("timeout", app) == "CIO_TIMEOUT"
    assert where_set("region", None) == "CIO_REGION"
    assert where_set("CIO_CELERY['region']", app) == "CIO_CELERY['region']"
