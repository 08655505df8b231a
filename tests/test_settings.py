"""One frozen settings object, built from env then explicit sources, errors name the setting."""

from __future__ import annotations

import dataclasses

import pytest
from celery import Celery

from cio_celery.exceptions import ConfigurationError
from cio_celery.settings import SETTINGS, Settings, build_settings, configure, settings_for_app


def test_defaults() -> None:
    s = build_settings(environ={})
    assert s.region == "us"
    assert s.track_base_url == "https://track.customer.io"
    assert s.app_base_url == "https://api.customer.io"
    assert s.queue == "cio" and s.fallback_queue == "cio.fallback" and s.send_queue == "cio.send"
    assert s.queues == ["cio", "cio.send", "cio.fallback"]
    assert s.queue_for("track") == "cio" and s.queue_for("send_email") == "cio.send"
    assert build_settings(environ={"CIO_SEND_QUEUE": "cio"}).queues == ["cio", "cio.fallback"]  # one shared lane
    assert s.max_countdown == 3240.0  # 90% of Redis' default 3600 s visibility timeout


def test_environment_variables_are_read_and_parsed() -> None:
    env = {
        "CIO_SITE_ID": "site", "CIO_TRACK_API_KEY": "tk", "CIO_APP_API_KEY": "ak", "CIO_REGION": "eu",
        "CIO_TIMEOUT": "2.5", "CIO_MAX_RETRIES": "4", "CIO_SHOW_ARGS": "yes",
        "CIO_TRACK_URL": "http://127.0.0.1:9999/", "CIO_REDIS_URL": "redis://127.0.0.1:6379/3",
    }
    s = build_settings(environ=env)
    assert (s.site_id, s.track_api_key, s.app_api_key) == ("site", "tk", "ak")
    assert s.timeout == 2.5 and s.max_retries == 4 and s.show_args is True
    assert s.track_base_url == "http://127.0.0.1:9999"
    assert s.app_base_url == "https://api-eu.customer.io"


def test_explicit_values_override_the_environment() -> None:
    s = build_settings({"timeout": 3, "region": "eu"}, environ={"CIO_TIMEOUT": "9", "CIO_REGION": "us"})
    assert s.timeout == 3 and s.region == "eu"


def test_settings_are_frozen() -> None:
    s = build_settings(environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.timeout = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "env", "setting"),
    [
        ({"region": "mars"}, {}, "region"),
        ({"track_url": "ftp://x"}, {}, "track_url"),
        ({"app_url": "https://h/?k=v"}, {}, "app_url"),
        ({"redis_url": "http://x"}, {}, "redis_url"),
        ({"timeout": 0}, {}, "timeout"),
        ({"max_retries": -1}, {}, "max_retries"),
        ({"retry_backoff_base": 10, "retry_backoff_max": 1}, {}, "retry_backoff_max"),
        ({"visibility_timeout": 1}, {}, "visibility_timeout"),
        ({"fallback_queue": "cio"}, {}, "fallback_queue"),
        ({"key_prefix": "a{b}"}, {}, "key_prefix"),
        ({}, {"CIO_TIMEOUT": "fast"}, "CIO_TIMEOUT"),
        ({"no_such_thing": 1}, {}, "settings.no_such_thing"),
        ({"redis_url": "redis://[::1"}, {}, "redis_url"),
        ({"redis_url": "redis://:pw@host:99999/0"}, {}, "redis_url"),
        ({"redis_url": "redis://:pw@host:port/0"}, {}, "redis_url"),
        ({"redis_url": "redis://:pw@host:6379/zero"}, {}, "redis_url"),
        ({"redis_url": "redis://:pw word@host/0"}, {}, "redis_url"),
        ({"redis_url": "django-redis://"}, {}, "redis_url"),
        ({"redis_url": "unix://"}, {}, "redis_url"),
        ({"redis_url": 6379}, {}, "redis_url"),
        ({}, {"CIO_REDIS_URL": "redis://[::1:6379/0"}, "redis_url"),
        ({"track_url": "http://[::1"}, {}, "track_url"),
        ({"track_url": "https://track.customer.io:70000"}, {}, "track_url"),
        ({"app_url": "https://user:pw@api.customer.io"}, {}, "app_url"),
        ({"app_url": "https://"}, {}, "app_url"),
        ({"spool_max_bytes": 1000}, {}, "spool_max_bytes"),
        ({"spool_max_attempts": 0}, {}, "spool_max_attempts"),
        ({"redis_url": "redis+cluster://"}, {}, "redis_url"),
        ({"redis_url": "redis+cluster://127.0.0.1:7000/2"}, {}, "redis_url"),
        ({"redis_url": "redis+sentinel://127.0.0.1:7000"}, {}, "redis_url"),
        ({"idempotency_task_retention": 600}, {}, "idempotency_task_retention"),
    ],
)
def test_bad_configuration_names_the_setting(overrides: dict, env: dict, setting: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_settings(overrides, environ=env)
    assert info.value.setting == setting
    assert str(info.value).startswith(f"cio_celery setting {setting}:")


def test_secrets_are_not_in_the_repr() -> None:
    s = build_settings({"track_api_key": "TOPSECRET1", "app_api_key": "TOPSECRET2", "site_id": "SITE-SECRET",
                        "redis_url": "redis://:pw-SECRET@h:1/0"}, environ={})
    assert "TOPSECRET" not in repr(s) and "pw-SECRET" not in repr(s)
    assert "SITE-SECRET" not in repr(s) and "site_id" not in repr(s)
    assert "SECRET" not in str(s)


def test_a_malformed_url_error_never_holds_the_url() -> None:
    for bad in ("redis://:pw-SECRET@[::1", "redis://:pw-SECRET@h:99999/0", "redis://:pw-SECRET@h/db"):
        with pytest.raises(ConfigurationError) as info:
            build_settings({"redis_url": bad}, environ={})
        assert "SECRET" not in str(info.value) and info.value.__cause__ is None
        assert info.value.__context__ is None or info.value.__suppress_context__  # no ValueError text


def test_a_malformed_broker_url_used_as_the_store_names_the_broker_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIO_REDIS_URL", raising=False)
    app = Celery("t", broker="redis://:pw-SECRET@127.0.0.1:99999/0", set_as_current=False)
    with pytest.raises(ConfigurationError) as info:
        settings_for_app(app)
    assert info.value.setting == "broker_url (the default redis_url)"
    assert "SECRET" not in str(info.value)


def test_every_setting_is_a_field_and_documented() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {s.name for s in SETTINGS} == fields
    assert all(s.env == "CIO_" + s.name.upper() and s.doc for s in SETTINGS)


def test_celery_conf_is_a_source_and_the_store_defaults_to_a_redis_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    for s in SETTINGS:
        monkeypatch.delenv(s.env, raising=False)
    app = Celery("t", broker="redis://127.0.0.1:6399/4", set_as_current=False)
    app.conf.cio_timeout = 4
    app.conf.broker_transport_options = {"visibility_timeout": 7200}
    s = settings_for_app(app)
    assert s.timeout == 4
    assert s.redis_url == "redis://127.0.0.1:6399/4"
    assert s.visibility_timeout == 7200 and s.max_countdown == 6480
    assert settings_for_app(app) is s, "built once"
    assert configure(app, timeout=1).timeout == 1
    assert settings_for_app(app).timeout == 1


def test_a_non_redis_broker_leaves_the_store_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIO_REDIS_URL", raising=False)
    app = Celery("t", broker="amqp://guest@127.0.0.1//", set_as_current=False)
    assert settings_for_app(app).redis_url is None


def test_every_setting_is_in_the_configuration_reference() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in text or f"`{s.env}`" not in text]
    assert missing == []


def test_a_cluster_store_url_is_accepted() -> None:
    for url in ("redis+cluster://127.0.0.1:7000", "rediss+cluster://:pw@node-1:7000/0",
                "redis+cluster://127.0.0.1:7000/"):
        s = build_settings({"redis_url": url}, environ={})
        assert s.store_is_cluster and s.batch_coalesce  # adaptive batching works on a cluster too
    assert not build_settings({"redis_url": "redis://127.0.0.1:6379/0"}, environ={}).store_is_cluster


def test_the_redelivery_horizon_is_derived_from_the_settings_and_may_only_be_raised() -> None:
    s = build_settings(environ={})
    # The retry horizon, a countdown, a claim lease and its jitter, the ledger's grace and sweep,
    # a release interval, a minute for kombu's restore sweep.
    assert s.redelivery_horizon == s.retry_horizon + 3240 + 75 + 1 + 1.25 * 300 + 1 + 60 == 15812
    assert s.task_key_retention == s.redelivery_horizon
    assert s.caller_key_retention == s.idempotency_retention == 7 * 86400
    longer = build_settings({"idempotency_task_retention": 86400}, environ={})
    assert longer.task_key_retention == 86400
    # A caller key's own message is redelivered like any other: never kept for less.
    both = build_settings({"idempotency_task_retention": 20 * 86400}, environ={})
    assert both.caller_key_retention == 20 * 86400
    fast = build_settings({"visibility_timeout": 120, "max_retries": 1}, environ={})
    assert fast.redelivery_horizon < s.redelivery_horizon
    with pytest.raises(ConfigurationError) as info:
        build_settings({"idempotency_task_retention": s.redelivery_horizon - 1}, environ={})
    assert "redelivery horizon" in str(info.value)
