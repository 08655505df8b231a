"""``flask --app example_project.flask_app.app run``; the worker: see README.md."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, Task
from flask import Flask, jsonify, request

from cio_celery import ValidationError, identify, track
from cio_celery.checks import recommended_celery_config
from cio_celery.contrib.flask import CioCelery

cio = CioCelery()


def celery_init_app(app: Flask) -> Celery:
    """From Flask's "Background Tasks with Celery" page."""

    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: object, **kwargs: object) -> object:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask, include=["cio_celery.tasks"])
    celery_app.config_from_object(app.config["CELERY"])
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    return celery_app


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    broker = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
    app.config.from_mapping(
        CELERY={**recommended_celery_config(), "broker_url": broker, "task_ignore_result": True},
        # Every cio_celery setting as CIO_CELERY_<NAME>; secrets come from the environment
        # (CIO_SITE_ID, CIO_TRACK_API_KEY, CIO_APP_API_KEY), not from this file.
        CIO_CELERY_HEALTH_MAX_DEAD_LETTERS=100,
    )
    app.config.update(config)
    celery_init_app(app)
    cio.init_app(app)

    @app.post("/signup")
    def signup() -> Any:
        body = request.get_json(force=True)
        try:
            identify.delay(body["id"], email=body["email"], plan=body.get("plan", "free"))
            track.delay(body["id"], "signed_up", {"plan": body.get("plan", "free")})
        except ValidationError as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(queued=True), 202

    return app
