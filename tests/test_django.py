"""The Django integration against real parts: Django + SQLite, the embedded Celery worker,
real Redis (also through django-redis) and the fake Customer.io.

Django can be set up once per process, so one module-scoped fixture configures it with
``settings.configure()`` (no ``DJANGO_SETTINGS_MODULE``: other modules' worker subprocesses
would inherit it) and the tests vary ``CIO_CELERY`` with ``override_settings``, which the
app config answers by reconfiguring the Celery app.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from helpers import wait_until

import cio_celery
from cio_celery import ValidationError, track
from cio_celery.breaker import Breaker
from cio_celery.settings import configure, settings_for_app
from cio_celery.store import redis_for
from cio_celery.testing import FakeCustomerIO

django = pytest.importorskip("django")

from django.conf import settings as dj_settings  # noqa: E402
from django.test.utils import (  # noqa: E402
    override_settings,
    setup_databases,
    setup_test_environment,
    teardown_databases,
    teardown_test_environment,
)

APP = "cio_celery.contrib.django"
KEY_PREFIX = "cio-dj"


def base_cio_celery(fake: FakeCustomerIO, store_url: str) -> dict[str, Any]:
    """CIO_CELERY of the test project: everything the worker needs, a few values that differ
    from the session app's ``cio_*`` conf (so the tests can tell who configured it)."""
    return {
        "site_id": fake.site_id,
        "track_api_key": fake.track_api_key,
        "app_api_key": fake.app_api_key,
        "track_url": fake.url,
        "app_url": fake.url,
        "redis_url": store_url,
        "key_prefix": KEY_PREFIX,
        "timeout": 3.0,
        "max_retries": 2,
        "retry_backoff_base": 0.05,
        "retry_backoff_max": 0.2,
    }


@pytest.fixture(scope="module")
def django_project(
    celery_session_app: Any, store_url: str, fake_cio_session: FakeCustomerIO, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SimpleNamespace]:
    if dj_settings.configured:
        pytest.skip("Django was configured by another module of this process")
    from django_project import settings as project_settings

    base = base_cio_celery(fake_cio_session, store_url)
    dj_settings.configure(
        **project_settings.build(tmp_dir=tmp_path_factory.mktemp("django"), store_url=store_url, cio_celery=base)
    )
    django.setup()  # the app config's ready() configures celery.current_app: the session app
    ready_settings = settings_for_app(celery_session_app)
    setup_test_environment()
    old_config = setup_databases(verbosity=0, interactive=False)
    try:
        yield SimpleNamespace(base=base, ready_settings=ready_settings, store_url=store_url)
    finally:
        teardown_databases(old_config, verbosity=0)
        teardown_test_environment()
        configure(celery_session_app)  # back to the settings of its conf, for later modules


@pytest.fixture()
def dj(django_project: SimpleNamespace, worker_app: Any) -> SimpleNamespace:
    """The project with a running worker; worker_app reset the app's settings, CIO_CELERY is reapplied."""
    from cio_celery.contrib.django import configure_from_django

    configure_from_django()
    assert settings_for_app(worker_app).key_prefix == KEY_PREFIX
    return SimpleNamespace(**vars(django_project), app=worker_app)


@pytest.fixture()
def client(dj: SimpleNamespace) -> Any:
    from django.test import Client

    return Client()


def cio_checks() -> list[Any]:
    from django.core.checks import run_checks

    return list(run_checks(tags=["cio_celery"]))


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


# -- settings and ready() -----------------------------------------------------------------


def test_ready_configures_the_celery_app_from_cio_celery(
    django_project: SimpleNamespace, celery_session_app: Any
) -> None:
    from cio_celery.contrib.django import celery_app, cio_settings

    s = django_project.ready_settings  # read right after django.setup()
    assert s.key_prefix == KEY_PREFIX and s.timeout == 3.0  # CIO_CELERY over the conf's cio_timeout=2
    assert s.site_id == django_project.base["site_id"]
    assert s.spool_dir == celery_session_app.conf.cio_spool_dir  # the Celery conf still applies underneath
    assert celery_app() is celery_session_app  # celery.current_app, as no celery_app is given
    assert cio_settings().key_prefix == KEY_PREFIX


def test_bad_cio_celery_does_not_crash_ready_and_keeps_the_app_running(
    dj: SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    from django.apps import apps

    before = settings_for_app(dj.app)
    secret = "trk-SECRET-never-logged"
    caplog.set_level(logging.WARNING, logger="cio_celery.contrib.django")
    with override_settings(CIO_CELERY={**dj.base, "track_api_key": secret, "region": "mars", "colour": "blue"}):
        apps.get_app_config("cio_celery").ready()  # what Django runs at start-up; must not raise
        assert settings_for_app(dj.app) is before  # not applied: the app keeps what it had
    text = caplog.text
    assert "CIO_CELERY['region']" in text and "colour" in text
    assert secret not in text


# -- delay_on_commit through a real view, transaction and worker ---------------------------


def test_rolled_back_view_sends_nothing_committed_view_is_delivered_once(
    client: Any, fake: FakeCustomerIO
) -> None:
    from django_project.models import Signup

    rolled = client.post("/signup/", {"email": "ada@example.com", "customer_id": "u-rolled", "fail": "1"})
    assert rolled.status_code == 409
    assert not Signup.objects.exists()
    time.sleep(0.5)  # a published operation would reach the fake within this on an idle worker
    assert fake.requests == []

    committed = client.post("/signup/", {"email": "bob@example.com", "customer_id": "u-committed"})
    assert committed.status_code == 201
    applied = fake.wait_for_applied(1, timeout=10)
    time.sleep(0.3)  # room for a duplicate to arrive
    assert [(a.operation, a.customer_id) for a in fake.applied] == [("track", "u-committed")]
    assert len(fake.requests_for("track")) == 1
    assert applied[0].json["name"] == "signed_up"
    assert Signup.objects.filter(email="bob@example.com").exists()


def test_bad_input_to_delay_on_commit_raises_at_the_call_inside_the_transaction(
    client: Any, fake: FakeCustomerIO
) -> None:
    from django.db import transaction
    from django_project.models import Signup

    with transaction.atomic():
        Signup.objects.create(email="carol@example.com")
        with pytest.raises(ValidationError) as info:
            track.delay_on_commit("u-1", "x" * 200)  # event names are limited to 100 bytes
        assert info.value.field == "name"
        assert transaction.get_connection().in_atomic_block  # raised at the call, not at commit
        track.delay_on_commit("u-1", "valid_after_invalid")
    # The transaction committed: only the valid call was published.
    fake.wait_for_applied(1, timeout=10)
    time.sleep(0.3)
    assert [a.json["name"] for a in fake.applied] == ["valid_after_invalid"]

    # Through the view: the ValidationError rolls the row back and answers 400 naming the field.
    resp = client.post("/signup/", {"email": "dan@example.com", "customer_id": ""})
    assert resp.status_code == 400 and resp.json() == {"error": "invalid", "field": "customer_id"}
    assert not Signup.objects.filter(email="dan@example.com").exists()


# -- system checks ---------------------------------------------------------------------------


def test_check_passes_on_the_project_and_reports_celery_settings_as_warnings(dj: SimpleNamespace) -> None:
    from django.core.management import call_command

    messages = cio_checks()
    assert [m for m in messages if m.is_serious()] == []
    # The session app keeps Celery's defaults: check_configuration's warnings, with setting names.
    w010 = [m.msg for m in messages if m.id == "cio_celery.W010"]
    assert any(m.startswith("worker_prefetch_multiplier:") for m in w010)
    call_command("check", stdout=io.StringIO(), stderr=io.StringIO())  # no SystemCheckError


def test_check_names_a_missing_key_and_keeps_secrets_out(
    dj: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    for env in ("CIO_SITE_ID", "CIO_TRACK_API_KEY", "CIO_APP_API_KEY"):
        monkeypatch.delenv(env, raising=False)
    secret = "site-SECRET-do-not-print"
    # A bare app without cio_* conf: only CIO_CELERY and the environment can provide the keys.
    # "" means unset, as for an empty CIO_* variable (os.environ.get("CIO_TRACK_API_KEY", "")).
    config = {"celery_app": "django_project.bare_celery.app", "site_id": secret, "track_api_key": ""}
    with override_settings(CIO_CELERY=config):
        messages = cio_checks()
        out = io.StringIO()
        with pytest.raises(SystemCheckError) as info:
            call_command("check", stdout=out, stderr=out)
    e001 = [m.msg for m in messages if m.id == "cio_celery.E001"]
    assert e001 == ["CIO_CELERY['track_api_key'] is not set (or CIO_TRACK_API_KEY)"]
    assert "CIO_CELERY['app_api_key'] is not set (or CIO_APP_API_KEY)" in [
        m.msg for m in messages if m.id == "cio_celery.W001"
    ]
    report = str(info.value) + out.getvalue()
    assert "cio_celery.E001" in report and "CIO_CELERY['track_api_key']" in report
    assert secret not in report and all(secret not in str(m) for m in messages)

    # The environment variable satisfies it, under the empty key.
    monkeypatch.setenv("CIO_TRACK_API_KEY", "from-env")
    with override_settings(CIO_CELERY=config):
        assert "cio_celery.E001" not in ids(cio_checks())
        from django_project.bare_celery import app as bare

        assert settings_for_app(bare).track_api_key == "from-env"  # applied by override_settings


@pytest.mark.parametrize(
    ("extra", "check_id", "text"),
    [
        ({"trak_api_key": "x"}, "cio_celery.E002", "CIO_CELERY['trak_api_key'] is not a cio_celery setting"),
        ({"region": "mars"}, "cio_celery.E003", "CIO_CELERY['region'] must be one of ['eu', 'us']"),
        ({"timeout": "soon"}, "cio_celery.E003", "CIO_CELERY['timeout'] cannot be parsed"),
        ({"celery_app": "no_such_module.app"}, "cio_celery.E005",
         "CIO_CELERY['celery_app'] cannot be imported: no module named 'no_such_module'"),
        ({"redis_alias": "nope"}, "cio_celery.E006", "CIO_CELERY['redis_alias'] names no cache in CACHES"),
        ({"redis_alias": "default"}, "cio_celery.E007", "BACKEND 'django.core.cache.backends.locmem.LocMemCache'"),
        ({"redis_alias": "cio"}, "cio_celery.E008", "CIO_CELERY['redis_alias'] and CIO_CELERY['redis_url']"),
        ({"health_max_dead_letters": -1}, "cio_celery.E009", "CIO_CELERY['health_max_dead_letters']"),
    ],
)
def test_check_reports_unknown_keys_and_bad_values_by_name(
    dj: SimpleNamespace, extra: dict[str, Any], check_id: str, text: str
) -> None:
    with override_settings(CIO_CELERY={**dj.base, **extra}):
        messages = cio_checks()
    found = [m for m in messages if m.id == check_id]
    assert found, ids(messages)
    assert text in found[0].msg
    assert found[0].is_serious()
    assert all(dj.base["track_api_key"] not in str(m) for m in messages)
    if check_id == "cio_celery.E002":
        assert found[0].hint == "Did you mean 'track_api_key'?"


def test_check_reports_celery_errors_from_check_configuration(dj: SimpleNamespace) -> None:
    # A visibility timeout shorter than one attempt: an error of check_configuration, as E010.
    with override_settings(CIO_CELERY={**dj.base, "task_time_limit": 30.0}):
        old = dj.app.conf.broker_transport_options
        dj.app.conf.broker_transport_options = {"visibility_timeout": 10}
        try:
            messages = cio_checks()
        finally:
            dj.app.conf.broker_transport_options = old
    e010 = [m.msg for m in messages if m.id == "cio_celery.E010"]
    assert any(m.startswith("broker_transport_options.visibility_timeout:") for m in e010), e010


# -- health view -----------------------------------------------------------------------------


def test_health_view_answers_200_then_503_while_the_breaker_is_open(client: Any, dj: SimpleNamespace) -> None:
    resp = client.get("/cio/health/")
    assert resp.status_code == 200
    assert "no-cache" in resp["Cache-Control"] and "no-store" in resp["Cache-Control"]
    body = resp.json()
    assert body["status"] == "ok" and body["healthy"] is True and body["problems"] == []
    assert body["breaker"]["state"] == "closed" and not body["breaker"]["time_left"]
    assert (body["fallback_depth"], body["dead_letters"], body["spool_depth"]) == (0, 0, 0)

    breaker = Breaker(settings_for_app(dj.app))
    breaker.open(30.0)
    try:
        resp = client.get("/cio/health/")
        assert resp.status_code == 503
        body = resp.json()
        assert body["status"] == "unhealthy" and [p["name"] for p in body["problems"]] == ["breaker_open"]
        assert body["breaker"]["state"] == "open" and 25 < body["breaker"]["time_left"] <= 36
    finally:
        breaker.reset()
    assert client.get("/cio/health/").status_code == 200
    assert client.post("/cio/health/").status_code == 405


def test_health_thresholds_come_from_cio_celery(client: Any, dj: SimpleNamespace, fake: FakeCustomerIO) -> None:
    fake.fail_next(status=400)  # a permanent refusal: the operation is dead-lettered
    track.delay("u-dead", "refused")
    wait_until(lambda: cio_celery.dead_letters(dj.app).count() == 1, timeout=10, what="a dead letter")
    assert client.get("/cio/health/").status_code == 200  # dead letters are reported, not judged
    with override_settings(CIO_CELERY={**dj.base, "health_max_dead_letters": 0}):
        resp = client.get("/cio/health/")
    assert resp.status_code == 503
    assert [(p["name"], p["message"]) for p in resp.json()["problems"]] == [
        ("dead_letters_over_threshold", "1 dead letters (more than 0)")]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"health_max_fallback_depth": "lots"},
         "CIO_CELERY['health_max_fallback_depth'] must be a whole number, 0 or more"),
        ({"health_ignore": ["no_such_problem"]}, "CIO_CELERY['health_ignore'] must be a list of problem names"),
        ({"redis_alias": "nope", "redis_url": None}, "CIO_CELERY['redis_alias'] names no cache in CACHES"),
        # The app keeps its previous settings (the worker delivers), but health says CIO_CELERY is wrong.
        ({"region": "mars"}, "CIO_CELERY['region'] must be one of ['eu', 'us']"),
        ({"timeout": "soon"}, "CIO_CELERY['timeout'] cannot be parsed"),
    ],
)
def test_health_view_answers_503_not_500_on_a_configuration_error(
    client: Any, dj: SimpleNamespace, extra: dict[str, Any], problem: str
) -> None:
    with override_settings(CIO_CELERY={**dj.base, **extra}):
        resp = client.get("/cio/health/")
    assert resp.status_code == 503
    found = [p for p in resp.json()["problems"] if p["name"] == "configuration_invalid"]
    assert found and found[0]["message"].startswith(problem), resp.json()["problems"]
    assert "manage.py check" in found[0]["fix"]
    assert dj.base["track_api_key"] not in resp.content.decode()


# -- redis_alias -----------------------------------------------------------------------------


def test_redis_alias_reuses_the_django_redis_connection(
    client: Any, dj: SimpleNamespace, fake: FakeCustomerIO, store: redis.Redis
) -> None:
    from django_redis import get_redis_connection

    config = {k: v for k, v in dj.base.items() if k != "redis_url"} | {"redis_alias": "cio"}
    with override_settings(CIO_CELERY=config):
        assert "cio_celery.E006" not in ids(cio_checks()) and not [m for m in cio_checks() if m.is_serious()]
        s = settings_for_app(dj.app)
        assert s.redis_url == "django-redis://cio"
        # One pool: the store client is django-redis' own (per-thread client objects share it).
        assert redis_for(s).connection_pool is get_redis_connection("cio").connection_pool

        assert client.get("/cio/health/").status_code == 200
        track.delay("u-alias", "through_django_redis")
        fake.wait_for_applied(1, timeout=10)
        # The worker claimed the operation in the store through the alias: the keys are there.
        wait_until(lambda: store.keys(f"{{{KEY_PREFIX}}}:*"), timeout=5, what="store keys")
        Breaker(s).open(30.0)
        try:
            assert client.get("/cio/health/").status_code == 503
        finally:
            Breaker(s).reset()


def test_check_warns_when_the_current_celery_app_was_created_after_django_started(dj: SimpleNamespace) -> None:
    from celery import Celery

    late = Celery("created_late", broker="memory://", fixups=[])  # becomes celery.current_app
    try:
        messages = cio_checks()
    finally:
        dj.app.set_current()
    w002 = [m for m in messages if m.id == "cio_celery.W002"]
    assert len(w002) == 1 and "'created_late'" in w002[0].msg and not w002[0].is_serious()
    assert "cio_celery.W002" not in ids(cio_checks())  # the session app was configured at start-up
    late.close()


@pytest.mark.parametrize(
    ("variable", "value", "text"),
    [
        ("CIO_TIMEOUT", "abc", "CIO_TIMEOUT cannot be parsed"),
        ("CIO_REGION", "mars", "CIO_REGION must be one of ['eu', 'us']"),
    ],
)
def test_a_bad_environment_value_is_an_e003_naming_the_variable_and_health_says_so(
    client: Any, dj: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, text: str
) -> None:
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    monkeypatch.setenv(variable, value)
    config = {k: v for k, v in dj.base.items() if k != "timeout"}  # the environment decides
    with override_settings(CIO_CELERY=config):
        e003 = [m.msg for m in cio_checks() if m.id == "cio_celery.E003"]
        out = io.StringIO()
        with pytest.raises(SystemCheckError) as info:
            call_command("check", stdout=out, stderr=out)
        resp = client.get("/cio/health/")
    assert [m for m in e003 if m.startswith(text)], e003
    assert "cio_celery.E003" in str(info.value) and variable in str(info.value)
    assert resp.status_code == 503
    assert any(p["name"] == "configuration_invalid" and p["message"].startswith(text) for p in resp.json()["problems"])
