"""The Flask example: ``flask --app example_project.flask_app.app run``; the worker: see README.md.

Flask's documented Celery pattern ("Background Tasks with Celery"): the Celery settings live
in ``app.config["CELERY"]``, ``celery_init_app`` makes the Celery app and stores it in
``app.extensions["celery"]``, where ``CioCelery.init_app`` finds it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from flask import Flask, jsonify, request

from cio_celery import ValidationError, identify, track
from cio_celery.checks import recommended_celery_config
from cio_celery.contrib.flask import CioCelery

cio = CioCelery()  # one extension object, any number of apps


def celery_init_app(app: Flask) -> Celery:
    """From Flask's "Background Tasks with Celery" page, plus ``include`` for cio_celery's tasks."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask, include=["cio_celery.tasks"])
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__)
    app.config.from_mapping(
        CELERY=dict(
            recommended_celery_config(),  # late acks, prefetch 1, visibility timeout ...
            broker_url=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0"),
            task_ignore_result=True,
        ),
        # Any cio_celery setting as CIO_CELERY_<NAME>. The secrets (CIO_SITE_ID,
        # CIO_TRACK_API_KEY, CIO_APP_API_KEY) stay in the environment, which applies underneath.
        CIO_CELERY_TIMEOUT=5,
        CIO_CELERY_HEALTH_MAX_DEAD_LETTERS=100,  # /cio/health answers 503 above this
    )
    app.config.from_prefixed_env()  # FLASK_CIO_CELERY_MAX_RETRIES=5 ... from the environment
    if test_config is not None:
        app.config.from_mapping(test_config)
    celery_init_app(app)
    cio.init_app(app)  # configures the Celery app (errors name the key), registers /cio/health

    @app.post("/signup")
    def signup() -> Any:
        body = request.get_json(force=True)
        plan = body.get("plan", "free")
        try:
            identify.delay(body["id"], email=body["email"], plan=plan)
            track.delay(body["id"], "signed_up", {"plan": plan})
        except ValidationError as exc:  # bad input: raised before anything is published
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(queued=True), 202

    @app.post("/events/<name>")
    def event(name: str) -> Any:
        body = request.get_json(force=True)
        try:
            track.delay(body["id"], name, body.get("data") or {})
        except ValidationError as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(queued=True), 202

    return app
