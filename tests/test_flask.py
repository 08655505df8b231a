"""Flask: the extension with an app factory, operations from a real view through the real worker,
the health blueprint, configuration errors named by their Flask config key."""

from __future__ import annotations

import time
from typing import Any

import pytest
from flask import Flask, jsonify, request

from cio_celery import ConfigurationError, ValidationError, identify, track
from cio_celery.breaker import Breaker
from cio_celery.contrib.flask import CioCelery
from cio_celery.deadletters import DeadLetters
from cio_celery.testing import FakeCustomerIO

cio = CioCelery()  # one instance, many apps (the factory pattern)


def create_app(celery: Any, **config: Any) -> Flask:
    app = Flask("cio_flask_test")
    app.config.update(config)
    app.extensions["celery"] = celery  # what Flask's documented celery_init_app does
    cio.init_app(app)

    @app.post("/signup")
    def signup() -> Any:
        body = request.get_json()
        try:
            identify.delay(body["id"], email=body["email"], plan=body["plan"])
            track.delay(body["id"], body["event"], {"plan": body["plan"]})
        except ValidationError as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(ok=True), 202

    return app


def test_a_view_delivers_through_the_worker(worker_app: Any, fake: FakeCustomerIO) -> None:
    app = create_app(worker_app)
    client = app.test_client()
    response = client.post("/signup", json={"id": "u-flask", "email": "ada@example.com", "plan": "pro",
                                            "event": "signed_up"})
    assert response.status_code == 202
    fake.wait_for_applied(2, timeout=20)
    assert sorted(a.operation for a in fake.applied) == ["identify", "track"]


def test_bad_input_is_a_400_from_the_view(worker_app: Any, fake: FakeCustomerIO) -> None:
    client = create_app(worker_app).test_client()
    response = client.post("/signup", json={"id": "u1", "email": "a@b.c", "plan": "pro", "event": ""})
    assert response.status_code == 400
    assert response.get_json()["field"] == "name"


def test_health_blueprint_200_then_503_with_the_breaker_open(worker_app: Any, fake: FakeCustomerIO) -> None:
    app = create_app(worker_app, CIO_CELERY_HEALTH_URL_PREFIX="/ops")
    assert "cio_celery.health" in app.view_functions
    client = app.test_client()
    ok = client.get("/ops/health")
    assert ok.status_code == 200
    assert ok.headers["Cache-Control"] == "no-store"
    body = ok.get_json()
    assert body["breaker"]["state"] == "closed"
    assert {"fallback_depth", "dead_letters", "spool_depth", "suppressed_duplicates"} <= set(body)
    breaker = Breaker(app.extensions["cio_celery"].settings)
    breaker.open()
    try:
        down = client.get("/ops/health")
        assert down.status_code == 503
        assert down.get_json()["breaker"]["state"] == "open"
        assert down.get_json()["breaker"]["opened_by_hand"] is True
    finally:
        breaker.reset()
    assert client.get("/ops/health").status_code == 200


def test_thresholds_make_dead_letters_unhealthy(worker_app: Any, fake: FakeCustomerIO) -> None:
    app = create_app(worker_app, CIO_CELERY_HEALTH_MAX_DEAD_LETTERS=0)
    fake.fail_next(1, status=400)
    track.delay("u1", "rejected")
    state = app.extensions["cio_celery"]
    letters = DeadLetters(state.settings, worker_app)
    deadline = time.monotonic() + 20
    while letters.count() == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    response = app.test_client().get("/cio/health")
    assert response.status_code == 503
    assert response.get_json()["problems"] == ["1 dead letters (more than 0)"]


def test_config_keys_and_errors(worker_app: Any) -> None:
    app = create_app(worker_app, CIO_CELERY_TIMEOUT="4.5", CIO_CELERY_HEALTH_BLUEPRINT=False)
    assert app.extensions["cio_celery"].settings.timeout == 4.5
    assert "cio_celery.health" not in app.view_functions
    with pytest.raises(ConfigurationError) as bad:
        create_app(worker_app, CIO_CELERY_TIMEOUT="soon")
    assert bad.value.setting == "CIO_CELERY_TIMEOUT"
    with pytest.raises(ConfigurationError) as unknown:
        create_app(worker_app, CIO_CELERY_TIMEOUTT=3)
    assert unknown.value.setting == "CIO_CELERY_TIMEOUTT"


def test_the_factory_makes_independent_apps(worker_app: Any) -> None:
    a = create_app(worker_app, CIO_CELERY_HEALTH_MAX_DEAD_LETTERS=5)
    b = create_app(worker_app)
    assert a.extensions["cio_celery"] is not b.extensions["cio_celery"]
    assert a.extensions["cio_celery"].max_dead_letters == 5 and b.extensions["cio_celery"].max_dead_letters is None
