"""A Flask app using cio_celery with Flask's documented Celery pattern."""
