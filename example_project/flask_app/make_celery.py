"""``celery -A example_project.flask_app.make_celery worker -Q cio,cio.send,cio.fallback`` (as in Flask's docs)."""

from example_project.flask_app.app import create_app

flask_app = create_app()
celery_app = flask_app.extensions["celery"]
