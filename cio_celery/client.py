"""Thin subclasses of the SDK clients: our URLs, no SDK retries, structured errors.

The SDK retries by itself (hiding failures from the breaker and multiplying attempts),
builds https-only URLs, and raises ``CustomerIOException`` whose message holds the
payload and URL. These subclasses keep the SDK's request building and replace exactly
those three things.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import customerio
import requests
from customerio.client_base import TCPKeepAliveHTTPAdapter

from ._process import PerProcess
from .classify import classify
from .settings import Settings

__all__ = ["AppClient", "Clients", "RedactPersonPaths", "TrackClient", "clients_for", "install_log_redaction"]


_PERSON_PATH = re.compile(r"/(customers|devices)/[^/\s\"?]+")


class RedactPersonPaths(logging.Filter):
    """Masks person and device ids in urllib3's debug lines (``POST /api/v1/customers/<id>``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and record.args:
            record.args = tuple(
                _PERSON_PATH.sub(r"/\1/***", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _PERSON_PATH.sub(r"/\1/***", record.msg)
        return True


def install_log_redaction() -> None:
    """Attach the id-masking filter to urllib3's connection-pool logger (once)."""
    pool_logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, RedactPersonPaths) for f in pool_logger.filters):
        pool_logger.addFilter(RedactPersonPaths())


def _session(user_agent: str, base_url: str) -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = user_agent
    # requests reads the proxy and CA-bundle environment variables on every request (~0.2 ms,
    # a scan of os.environ); this client only talks to one host, so read them once.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(base_url)
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    # max_retries=0: every retry belongs to the task layer, where the breaker sees it.
    adapter = TCPKeepAliveHTTPAdapter(max_retries=0, pool_connections=4, pool_maxsize=16)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class _StructuredErrors:
    """Mixin replacing the SDK's ``send_request`` with one that raises our errors."""

    timeout: float
    http: requests.Session
    _sanitize: Any  # from the SDK's ClientBase

    def send_request(self, method: str, url: str, data: dict[str, Any]) -> requests.Response:
        try:
            response = self.http.request(
                method, url=url, json=self._sanitize(data), timeout=self.timeout
            )
        except requests.RequestException as exc:
            err = classify("customerio", exc=exc)
            assert err is not None
            # `from None`: the requests exception's text holds the URL (a customer id).
            raise err from None
        err = classify("customerio", status=response.status_code, headers=response.headers)
        if err is not None:
            raise err
        return response


class TrackClient(_StructuredErrors, customerio.CustomerIO):  # type: ignore[misc]
    """Track API client honouring ``track_url``, for every call including ``batch``."""

    def __init__(self, settings: Settings) -> None:
        self._track_base = settings.track_base_url
        super().__init__(
            site_id=settings.site_id,
            api_key=settings.track_api_key,
            region=customerio.Regions.EU if settings.region == "eu" else customerio.Regions.US,
            retries=0,
            timeout=settings.timeout,
        )

    def setup_base_url(self) -> None:
        self.base_url = f"{self._track_base}/api/v1"

    def batch(self, operations: list[dict[str, Any]]) -> requests.Response:
        return self.send_request("POST", f"{self._track_base}/api/v2/batch", {"batch": operations})

    def pageview_with_id(
        self, customer_id: Any, page: str, event_id: str | None, data: dict[str, Any]
    ) -> requests.Response:
        """A pageview carrying an event ``id`` (the SDK's pageview cannot send one)."""
        body: dict[str, Any] = {"type": "page", "name": page, "data": self._sanitize(data)}
        if event_id is not None:
            body["id"] = event_id
        return self.send_request("POST", self.get_event_query_string(customer_id), body)

    def backfill_with_id(
        self, customer_id: Any, name: str, timestamp: int, event_id: str | None, data: dict[str, Any]
    ) -> requests.Response:
        """A backfill carrying an event ``id`` (the SDK's backfill cannot send one)."""
        body: dict[str, Any] = {"name": name, "data": self._sanitize(data), "timestamp": int(timestamp)}
        if event_id is not None:
            body["id"] = event_id
        return self.send_request("POST", self.get_event_query_string(customer_id), body)

    def _build_session(self) -> requests.Session:
        session = _session(f"cio_celery (Customer.io Python Client/{customerio.client_base.ClientVersion})",
                           self._track_base)
        session.auth = (self.site_id or "", self.api_key or "")
        return session


class AppClient(_StructuredErrors, customerio.APIClient):  # type: ignore[misc]
    """App API client honouring ``app_url``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(
            key=settings.app_api_key,
            url=settings.app_base_url,
            retries=0,
            timeout=settings.timeout,
        )

    def _build_session(self) -> requests.Session:
        session = _session(f"cio_celery (Customer.io Python Client/{customerio.client_base.ClientVersion})",
                           self.url)
        session.headers["Authorization"] = f"Bearer {self.key or ''}"
        return session


class Clients:
    """The pair of clients of one process, built lazily."""

    def __init__(self, settings: Settings) -> None:
        install_log_redaction()
        self.settings = settings
        self._track: TrackClient | None = None
        self._app: AppClient | None = None

    @property
    def track(self) -> TrackClient:
        if self._track is None:
            self._track = TrackClient(self.settings)
        return self._track

    @property
    def app(self) -> AppClient:
        if self._app is None:
            self._app = AppClient(self.settings)
        return self._app

    def close(self) -> None:
        for client in (self._track, self._app):
            if client is not None:
                client.close()


_clients: PerProcess[Clients] = PerProcess()


def clients_for(settings: Settings) -> Clients:
    """This process's clients for ``settings``: pooled connections are never shared across a fork."""
    return _clients.get(id(settings), lambda: Clients(settings))
