"""Framework integrations: Django, Flask, Prometheus."""
