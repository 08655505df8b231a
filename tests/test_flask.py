"""Flask: ``CioCelery`` with an app factory, operations from real views through the real worker,
the health blueprint against the real store, configuration errors named by their Flask key.

Real parts only: redis-server, the embedded Celery worker and the fake Customer.io over HTTP.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from celery import _state as celery_state
from flask import Flask, jsonify, request

from cio_celery import ConfigurationError, ValidationError, identify, track
from cio_celery.breaker import Breaker
from cio_celery.contrib.flask import CioCelery, CioCeleryState, health_blueprint
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import configure, settings_for_app
from cio_celery.testing import FakeCustomerIO

cio = CioCelery()  # one extension object, many apps (the factory pattern)


def create_app(test_config: Mapping[str, Any] | None = None, celery: Celery | None = None) -> Flask:
    """The factory of Flask's tutorial; the Celery app is put where Flask's ``celery_init_app`` puts it."""
    app = Flask(__name__)
    app.config.from_mapping(test_config or {})
    if celery is not None:
        app.extensions["celery"] = celery
    cio.init_app(app)

    @app.post("/signup")
    def signup() -> Any:
        body = request.get_json()
        identify.delay(body["id"], email=body["email"], plan=body["plan"])
        track.delay(body["id"], "signed_up", {"plan": body["plan"]})
        return jsonify(queued=True), 202

    @app.post("/events/<name>")
    def event(name: str) -> Any:  # bad input caught: a 400 naming the field
        try:
            track.delay(request.get_json()["id"], name, {"source": "web"})
        except ValidationError as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(queued=True), 202

    @app.post("/raw-event")
    def raw_event() -> Any:  # bad input not caught: the ValidationError reaches the caller
        body = request.get_json()
        track.delay(body["id"], body["name"])
        return jsonify(queued=True), 202

    return app


@pytest.fixture()
def flask_celery(worker_app: Any) -> Iterator[Any]:
    """The session Celery app (the embedded worker runs it); its settings are restored afterwards."""
    yield worker_app
    configure(worker_app)


@pytest.fixture()
def private_celery(broker_url: str) -> Iterator[Celery]:
    """A Celery app of one test that no worker runs, leaving Celery's current/default app alone."""
    app = Celery("cio-flask-private", broker=broker_url, set_as_current=False)
    yield app
    app.close()


def _wait(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_signup_view_delivers_identify_and_track_through_the_worker(flask_celery: Any, fake: FakeCustomerIO) -> None:
    client = create_app(celery=flask_celery).test_client()
    response = client.post("/signup", json={"id": "u-flask-1", "email": "ada@example.com", "plan": "pro"})
    assert response.status_code == 202
    fake.wait_for_applied(2, timeout=10)
    applied = {a.operation: a for a in fake.applied}
    assert sorted(applied) == ["identify", "track"]
    assert applied["identify"].customer_id == applied["track"].customer_id == "u-flask-1"
    assert applied["identify"].json["email"] == "ada@example.com"
    assert applied["track"].json["name"] == "signed_up"
    assert applied["track"].event_id  # minted at enqueue: Customer.io drops a duplicate


def test_a_validation_error_raises_in_the_view_and_can_become_a_400(flask_celery: Any, fake: FakeCustomerIO) -> None:
    app = create_app({"TESTING": True}, celery=flask_celery)
    client = app.test_client()
    with pytest.raises(ValidationError) as raised:  # uncaught: reaches the caller of .delay()
        client.post("/raw-event", json={"id": "u-flask-2", "name": ""})
    assert raised.value.operation == "track" and raised.value.field == "name"
    bad = client.post("/events/" + "x" * 300, json={"id": "u-flask-2"})  # caught by the view
    assert bad.status_code == 400
    assert bad.get_json()["field"] == "name"
    # Nothing was published: the single worker takes the queue in order, so had either bad
    # operation been sent it would be applied before this good one.
    assert client.post("/events/clicked", json={"id": "u-flask-2"}).status_code == 202
    fake.wait_for_applied(1, timeout=10)
    time.sleep(0.2)
    assert [(a.operation, a.json["name"]) for a in fake.applied] == [("track", "clicked")]


def test_health_blueprint_answers_200_then_503_while_the_breaker_is_open(
    flask_celery: Any, fake: FakeCustomerIO
) -> None:
    app = create_app(celery=flask_celery)
    client = app.test_client()
    ok = client.get("/cio/health")
    assert ok.status_code == 200
    assert ok.headers["Cache-Control"] == "no-store"
    assert ok.mimetype == "application/json"
    body = ok.get_json()
    assert body["status"] == "ok" and body["healthy"] is True and body["problems"] == []
    assert body["breaker"]["state"] == "closed"
    assert "time_left" in body["breaker"]
    assert (body["fallback_depth"], body["dead_letters"], body["spool_depth"]) == (0, 0, 0)

    breaker = Breaker(CioCelery.state(app).settings)
    breaker.open(duration=60)
    try:
        down = client.get("/cio/health")
        assert down.status_code == 503
        assert down.headers["Cache-Control"] == "no-store"
        report = down.get_json()
        assert report["status"] == "unhealthy" and report["healthy"] is False
        assert [p["name"] for p in report["problems"]] == ["breaker_open"]
        assert report["breaker"]["state"] == "open"
        assert 50 < report["breaker"]["time_left"] <= 60
        breaker.open()  # by hand, no end
        by_hand = client.get("/cio/health").get_json()["breaker"]
        assert by_hand["opened_by_hand"] is True and by_hand["time_left"] is None
    finally:
        breaker.reset()
    assert client.get("/cio/health").status_code == 200


def test_dead_letter_threshold_makes_health_503(flask_celery: Any, fake: FakeCustomerIO) -> None:
    app = create_app({"CIO_CELERY_HEALTH_MAX_DEAD_LETTERS": 0}, celery=flask_celery)
    fake.fail_next(1, status=400)  # a permanent error: dead-lettered at once
    app.test_client().post("/events/rejected", json={"id": "u-flask-3"})
    letters = DeadLetters(CioCelery.state(app).settings, flask_celery)
    _wait(lambda: letters.count() == 1)
    response = app.test_client().get("/cio/health")
    assert response.status_code == 503
    [problem] = response.get_json()["problems"]
    assert (problem["name"], problem["message"]) == ("dead_letters_over_threshold", "1 dead letters (more than 0)")
    assert response.get_json()["dead_letters"] == 1


def test_config_keys_map_onto_the_settings(private_celery: Celery, store_url: str, tmp_path: Path) -> None:
    private_celery.conf.cio_site_id = "from-celery-conf"
    app = create_app({
        "CIO_CELERY_TIMEOUT": "4.5",          # a string, as read from the environment
        "CIO_CELERY_MAX_RETRIES": 5,
        "CIO_CELERY_SHOW_ARGS": "true",
        "CIO_CELERY_SITE_ID": "",             # empty: the Celery conf / environment decides
        "CIO_CELERY_REDIS_URL": store_url,
        "CIO_CELERY_SPOOL_DIR": str(tmp_path),
        "CIO_CELERY_HEALTH_MAX_FALLBACK_DEPTH": "10",
        "CIO_CELERY_HEALTH_URL_PREFIX": "/ops",
    }, celery=private_celery)
    state = app.extensions["cio_celery"]
    assert isinstance(state, CioCeleryState) and state.celery is private_celery
    s = state.settings
    assert (s.timeout, s.max_retries, s.show_args, s.site_id) == (4.5, 5, True, "from-celery-conf")
    assert settings_for_app(private_celery) is s  # installed on the Celery app the workers run
    assert (state.max_dead_letters, state.max_fallback_depth) == (None, 10)
    assert app.test_client().get("/ops/health").status_code == 200
    assert app.test_client().get("/cio/health").status_code == 404


def test_the_blueprint_can_be_left_out_and_registered_by_hand(private_celery: Celery, store_url: str) -> None:
    app = create_app({"CIO_CELERY_HEALTH_BLUEPRINT": False, "CIO_CELERY_REDIS_URL": store_url},
                     celery=private_celery)
    assert "cio_celery.health" not in app.view_functions
    app.register_blueprint(health_blueprint(), url_prefix="/internal/cio")
    assert app.test_client().get("/internal/cio/health").status_code == 200
    cio.init_app(app)  # again: config re-read, no second blueprint
    assert app.test_client().get("/internal/cio/health").status_code == 200


@pytest.mark.parametrize(("config", "key"), [
    ({"CIO_CELERY_TIMEOUT": "soon"}, "CIO_CELERY_TIMEOUT"),                       # cannot be parsed
    ({"CIO_CELERY_TIMEOUT": -1}, "CIO_CELERY_TIMEOUT"),                           # out of range
    ({"CIO_CELERY_REGION": "mars"}, "CIO_CELERY_REGION"),
    ({"CIO_CELERY_MAX_RETRIES": 2.5}, "CIO_CELERY_MAX_RETRIES"),
    ({"CIO_CELERY_BREAKER_ENABLED": "perhaps"}, "CIO_CELERY_BREAKER_ENABLED"),
    ({"CIO_CELERY_REDIS_URL": "http://secret-host:6379"}, "CIO_CELERY_REDIS_URL"),
    ({"CIO_CELERY_TIMEOUTT": 3}, "CIO_CELERY_TIMEOUTT"),                          # a typo
    ({"CIO_CELERY_HEALTH_MAX_DEAD_LETTERS": "many"}, "CIO_CELERY_HEALTH_MAX_DEAD_LETTERS"),
    ({"CIO_CELERY_RETRY_BACKOFF_MAX": 1, "CIO_CELERY_RETRY_BACKOFF_BASE": 5}, "CIO_CELERY_RETRY_BACKOFF_MAX"),
])
def test_a_bad_config_value_raises_at_init_app_naming_the_key(
    private_celery: Celery, config: dict[str, Any], key: str
) -> None:
    before = configure(private_celery)
    with pytest.raises(ConfigurationError) as bad:
        create_app(config, celery=private_celery)
    assert bad.value.setting == key
    assert str(bad.value).startswith(f"cio_celery setting {key}: ")
    assert "secret-host" not in str(bad.value) and "soon" not in str(bad.value)  # keys, never values
    assert settings_for_app(private_celery) is before  # the Celery app keeps its settings


def test_a_bad_environment_variable_is_named_as_such(
    private_celery: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CIO_TIMEOUT", "soon")
    with pytest.raises(ConfigurationError) as bad:
        create_app(celery=private_celery)
    assert bad.value.setting == "CIO_TIMEOUT"


def test_two_apps_from_one_factory_have_their_own_state(
    flask_celery: Any, private_celery: Celery, store_url: str
) -> None:
    first = create_app({"CIO_CELERY_HEALTH_MAX_DEAD_LETTERS": 5}, celery=flask_celery)
    second = create_app({"CIO_CELERY_HEALTH_MAX_DEAD_LETTERS": 7}, celery=flask_celery)
    third = create_app({"CIO_CELERY_TIMEOUT": 3, "CIO_CELERY_REDIS_URL": store_url}, celery=private_celery)
    states = [CioCelery.state(a) for a in (first, second, third)]
    assert len({id(s) for s in states}) == 3
    assert [s.max_dead_letters for s in states] == [5, 7, None]
    assert [s.celery for s in states] == [flask_celery, flask_celery, private_celery]
    assert states[2].settings.timeout == 3 and settings_for_app(private_celery).timeout == 3
    assert settings_for_app(flask_celery).timeout == 2.0  # the conftest's, untouched by the third app
    for app in (first, second, third):
        assert app.test_client().get("/cio/health").status_code == 200
        with app.app_context():
            assert CioCelery.state() is app.extensions["cio_celery"]


def test_celery_app_is_found_in_extensions_then_current_app(
    flask_celery: Any, private_celery: Celery, caplog: pytest.LogCaptureFixture
) -> None:
    bare = Flask("bare")
    with caplog.at_level(logging.WARNING, logger="cio_celery.contrib.flask"):
        assert CioCelery(bare).state(bare).celery is flask_celery  # Celery's current app
    assert not [r for r in caplog.records if "current app" in r.getMessage()]
    explicit = Flask("explicit")
    explicit.extensions["celery"] = flask_celery
    with caplog.at_level(logging.WARNING, logger="cio_celery.contrib.flask"):
        CioCelery(explicit, celery=private_celery)  # the argument wins over extensions
    assert CioCelery.state(explicit).celery is private_celery
    # private_celery is not Celery's current app: identify.delay() would not use it; said once.
    assert [r.getMessage().split(" configured")[0] for r in caplog.records if "current app" in r.getMessage()] == [
        "cio_celery: the Celery app 'cio-flask-private'"
    ]


def test_health_without_init_app_is_a_503_not_a_500() -> None:
    app = Flask("uninitialised")
    app.register_blueprint(health_blueprint(), url_prefix="/cio")
    response = app.test_client().get("/cio/health")
    assert response.status_code == 503
    [problem] = response.get_json()["problems"]
    assert problem["name"] == "configuration_invalid" and "init_app" in problem["fix"]


def test_the_example_app_delivers_and_reports_health(
    flask_celery: Any, fake: FakeCustomerIO, broker_url: str, store_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from example_project.flask_app.app import create_app as example_create_app
    finally:
        sys.path.pop(0)
    previous_default = celery_state.default_app
    try:
        monkeypatch.setenv("CELERY_BROKER_URL", broker_url)
        app = example_create_app({
            "CIO_CELERY_REDIS_URL": store_url,
            "CIO_CELERY_SPOOL_DIR": str(tmp_path),
        })
    finally:
        # celery_init_app made its Celery app the default one, which the embedded worker's
        # thread would then run the tasks of: the worker keeps the session app, as a separate
        # worker process would. This (web) thread keeps the example's app as its current one.
        celery_state.set_default_app(previous_default)
    example_celery = app.extensions["celery"]
    try:
        state = CioCelery.state(app)
        assert state.celery is example_celery and example_celery is not flask_celery
        assert state.settings.timeout == 5  # the example's CIO_CELERY_TIMEOUT
        conf = example_celery.conf  # Flask's CELERY mapping with recommended_celery_config() merged
        assert (conf.broker_url, conf.task_acks_late, conf.task_ignore_result) == (broker_url, True, True)
        client = app.test_client()
        assert client.post("/signup", json={"id": "u-example", "email": "ada@example.com"}).status_code == 202
        bad = client.post("/events/clicked", json={"id": "x" * 200})
        assert bad.status_code == 400 and bad.get_json()["field"] == "customer_id"
        fake.wait_for_applied(2, timeout=10)  # published by the example's app, run by the worker
        assert sorted(a.operation for a in fake.applied) == ["identify", "track"]
        health = client.get("/cio/health")
        assert health.status_code == 200 and health.get_json()["breaker"]["state"] == "closed"
    finally:
        flask_celery.set_current()
        example_celery.close()


def test_init_app_warns_about_missing_credentials_and_celery_settings_with_the_fix(
    private_celery: Celery, store_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for var in ("CIO_SITE_ID", "CIO_TRACK_API_KEY", "CIO_APP_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    app = Flask("no-credentials")
    app.config.update(CIO_CELERY_REDIS_URL=store_url, CIO_CELERY_SITE_ID="")  # "" means unset
    private_celery.conf.worker_prefetch_multiplier = 4
    with caplog.at_level(logging.WARNING, logger="cio_celery.contrib.flask"):
        CioCelery(app, celery=private_celery)
    messages = [r.getMessage() for r in caplog.records]
    track = [m for m in messages if "Track operations" in m]
    assert track == ["cio_celery: CIO_SITE_ID and CIO_TRACK_API_KEY not set: Track operations (identify, track ...) "
                     "will be dead-lettered as not_configured; set CIO_SITE_ID and CIO_TRACK_API_KEY (or "
                     "CIO_CELERY_SITE_ID and CIO_CELERY_TRACK_API_KEY) where the workers run"]
    assert any("CIO_APP_API_KEY not set" in m and "CIO_CELERY_HEALTH_IGNORE" in m for m in messages)
    prefetch = [m for m in messages if "worker_prefetch_multiplier" in m]
    assert prefetch and "recommended_celery_config()" in prefetch[0]

    # With the credentials (and the Track-only opt-out) it is silent about them.
    caplog.clear()
    app2 = Flask("with-credentials")
    app2.config.update(CIO_CELERY_REDIS_URL=store_url, CIO_CELERY_SITE_ID="s", CIO_CELERY_TRACK_API_KEY="t",
                       CIO_CELERY_HEALTH_IGNORE=["app_credentials_missing"])
    with caplog.at_level(logging.WARNING, logger="cio_celery.contrib.flask"):
        CioCelery(app2, celery=private_celery)
    assert not [r for r in caplog.records if "not set" in r.getMessage()]
    assert CioCelery.state(app2).ignore == ("app_credentials_missing",)
