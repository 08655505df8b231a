"""Thin subclasses of the SDK clients: our URLs, no SDK retries, structured errors.

The SDK retries by itself (hiding failures from the breaker and multiplying attempts),
builds https-only URLs, and raises ``CustomerIOException`` whose message holds the
payload and URL. These subclasses keep the SDK's request building and replace exactly
those three things.

They also refuse to send a request whose final URL is not the documented route of the
operation being performed (:data:`ROUTES`): requests/urllib3 remove ``.`` and ``..``
path segments before sending, so an id that validation let through by mistake would
otherwise reach another endpoint. Such a request raises ``PermanentError`` with reason
``invalid:url`` (dead-lettered, never sent).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
from collections.abc import Iterator
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import customerio
import requests
from customerio.client_base import TCPKeepAliveHTTPAdapter

from ._process import PerProcess
from .classify import classify
from .exceptions import PermanentError
from .settings import Settings

__all__ = [
    "ROUTES",
    "AppClient",
    "Clients",
    "RedactPersonPaths",
    "TrackClient",
    "clients_for",
    "install_log_redaction",
    "route_problem",
]

ROUTES: Final[dict[str, tuple[str, str]]] = {
    "identify": ("PUT", "/api/v1/customers/{id}"),
    "delete": ("DELETE", "/api/v1/customers/{id}"),
    "track": ("POST", "/api/v1/customers/{id}/events"),
    "pageview": ("POST", "/api/v1/customers/{id}/events"),
    "backfill": ("POST", "/api/v1/customers/{id}/events"),
    "track_anonymous": ("POST", "/api/v1/events"),
    "add_device": ("PUT", "/api/v1/customers/{id}/devices"),
    "delete_device": ("DELETE", "/api/v1/customers/{id}/devices/{id}"),
    "suppress": ("POST", "/api/v1/customers/{id}/suppress"),
    "unsuppress": ("POST", "/api/v1/customers/{id}/unsuppress"),
    "merge_customers": ("POST", "/api/v1/merge_customers"),
    "batch": ("POST", "/api/v2/batch"),
    "send_email": ("POST", "/v1/send/email"),
    "send_push": ("POST", "/v1/send/push"),
    "send_sms": ("POST", "/v1/send/sms"),
    "send_whatsapp": ("POST", "/v1/send/whatsapp"),
    "send_inbox_message": ("POST", "/v1/send/inbox_message"),
    "send_in_app": ("POST", "/v1/send/in_app"),
}
"""Each operation's documented method and path below the API base URL; ``{id}`` is one
percent-encoded path segment."""

_ROUTE_PATTERNS: Final[dict[str, re.Pattern[str]]] = {
    op: re.compile(re.escape(path).replace(re.escape("{id}"), "([^/]+)")) for op, (_, path) in ROUTES.items()
}
# The operation whose request is being built, set by the client methods below.
_operation: contextvars.ContextVar[str | None] = contextvars.ContextVar("cio_celery_operation", default=None)


@contextlib.contextmanager
def _performing(operation: str) -> Iterator[None]:
    token = _operation.set(operation)
    try:
        yield
    finally:
        _operation.reset(token)


def route_problem(operation: str | None, method: str, url: str, base_url: str) -> str | None:
    """Why ``method url`` is not ``operation``'s documented route below ``base_url``; None if it is.

    ``url`` is the URL as it will be sent (after requests' normalisation). Without an
    operation, any documented route with that method is accepted. The answer never holds
    the URL itself (it carries customer ids).
    """
    target, base = urlsplit(url), urlsplit(base_url)
    if (target.scheme, target.netloc) != (base.scheme, base.netloc):
        return "the request URL is not on the configured API host"
    prefix = base.path.rstrip("/")
    if not target.path.startswith(prefix + "/"):
        return "the request path is not below the configured base URL"
    path = target.path[len(prefix):]
    candidates = [operation] if operation is not None else [op for op, (m, _) in ROUTES.items() if m == method]
    for name in candidates:
        route = ROUTES.get(name)
        if route is None or route[0] != method:
            continue
        match = _ROUTE_PATTERNS[name].fullmatch(path)
        if match is not None and all(unquote(segment).strip(".") for segment in match.groups()):
            return None
    if operation is None:
        return f"{method} to this path is not a documented Customer.io route"
    return f"the request is not {ROUTES[operation][0]} {ROUTES[operation][1]}" if operation in ROUTES else (
        f"{operation} has no documented route"
    )


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
    """Mixin replacing the SDK's ``send_request`` with one that checks the route and raises our errors."""

    timeout: float
    http: requests.Session
    _sanitize: Any  # from the SDK's ClientBase
    _api_base: str

    def send_request(self, method: str, url: str, data: dict[str, Any]) -> requests.Response:
        try:
            # Prepared here so that the URL checked is the URL sent (dot segments removed).
            prepared = self.http.prepare_request(requests.Request(method, url, json=self._sanitize(data)))
            problem = route_problem(_operation.get(), str(prepared.method), str(prepared.url), self._api_base)
            if problem is not None:
                raise PermanentError("customerio", "invalid:url", detail=problem)
            response = self.http.send(prepared, timeout=self.timeout)
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
        self._api_base = self._track_base
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
        with _performing("batch"):
            return self.send_request("POST", f"{self._track_base}/api/v2/batch", {"batch": operations})

    # Each SDK method, run with its operation named so send_request can check the route.

    def identify(self, id: Any, /, **attributes: Any) -> Any:
        """The SDK's identify with ``id`` positional-only: an attribute may be named ``self``."""
        with _performing("identify"):
            return self.send_request("PUT", self.get_customer_query_string(id), attributes)

    def track(self, customer_id: Any, name: str, data: Any = None, id: Any = None,
              timestamp: Any = None) -> Any:
        with _performing("track"):
            return super().track(customer_id, name, data, id, timestamp)

    def track_anonymous(self, anonymous_id: Any, name: str, data: Any = None, id: Any = None,
                        timestamp: Any = None) -> Any:
        with _performing("track_anonymous"):
            return super().track_anonymous(anonymous_id, name, data, id, timestamp)

    def delete(self, customer_id: Any) -> Any:
        with _performing("delete"):
            return super().delete(customer_id)

    def add_device(self, customer_id: Any, device_id: Any, platform: str, /, **data: Any) -> Any:
        """The SDK's add_device with positional-only parameters (device data may hold any name)."""
        with _performing("add_device"):
            device = {**data, "id": device_id, "platform": platform}
            return self.send_request("PUT", self.get_device_query_string(customer_id), {"device": device})

    def delete_device(self, customer_id: Any, device_id: Any) -> Any:
        with _performing("delete_device"):
            return super().delete_device(customer_id, device_id)

    def suppress(self, customer_id: Any) -> Any:
        with _performing("suppress"):
            return super().suppress(customer_id)

    def unsuppress(self, customer_id: Any) -> Any:
        with _performing("unsuppress"):
            return super().unsuppress(customer_id)

    def merge_customers(self, primary_id_type: str, primary_id: Any, secondary_id_type: str,
                        secondary_id: Any) -> Any:
        with _performing("merge_customers"):
            return super().merge_customers(primary_id_type, primary_id, secondary_id_type, secondary_id)

    def pageview_with_id(
        self, customer_id: Any, page: str, event_id: str | None, data: dict[str, Any]
    ) -> requests.Response:
        """A pageview carrying an event ``id`` (the SDK's pageview cannot send one)."""
        body: dict[str, Any] = {"type": "page", "name": page, "data": self._sanitize(data)}
        if event_id is not None:
            body["id"] = event_id
        with _performing("pageview"):
            return self.send_request("POST", self.get_event_query_string(customer_id), body)

    def backfill_with_id(
        self, customer_id: Any, name: str, timestamp: int, event_id: str | None, data: dict[str, Any]
    ) -> requests.Response:
        """A backfill carrying an event ``id`` (the SDK's backfill cannot send one)."""
        body: dict[str, Any] = {"name": name, "data": self._sanitize(data), "timestamp": int(timestamp)}
        if event_id is not None:
            body["id"] = event_id
        with _performing("backfill"):
            return self.send_request("POST", self.get_event_query_string(customer_id), body)

    def _build_session(self) -> requests.Session:
        session = _session(f"cio_celery (Customer.io Python Client/{customerio.client_base.ClientVersion})",
                           self._track_base)
        session.auth = (self.site_id or "", self.api_key or "")
        return session


class AppClient(_StructuredErrors, customerio.APIClient):  # type: ignore[misc]
    """App API client honouring ``app_url``."""

    def __init__(self, settings: Settings) -> None:
        self._api_base = settings.app_base_url
        super().__init__(
            key=settings.app_api_key,
            url=settings.app_base_url,
            retries=0,
            timeout=settings.timeout,
        )

    def send_email(self, request: Any) -> Any:
        with _performing("send_email"):
            return super().send_email(request)

    def send_push(self, request: Any) -> Any:
        with _performing("send_push"):
            return super().send_push(request)

    def send_sms(self, request: Any) -> Any:
        with _performing("send_sms"):
            return super().send_sms(request)

    def send_whatsapp(self, request: Any) -> Any:
        with _performing("send_whatsapp"):
            return super().send_whatsapp(request)

    def send_inbox_message(self, request: Any) -> Any:
        with _performing("send_inbox_message"):
            return super().send_inbox_message(request)

    def send_in_app(self, request: Any) -> Any:
        with _performing("send_in_app"):
            return super().send_in_app(request)

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
