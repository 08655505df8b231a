"""The fake's own tests use the fixtures it ships to users."""

pytest_plugins = ["cio_celery.testing.pytest_plugin"]
