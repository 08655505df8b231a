"""A fake Customer.io (Track API + App API) served over real HTTP on loopback.

Point the ``customerio`` SDK (or any HTTP client) at :attr:`FakeCustomerIO.url` and it
answers every endpoint the SDK calls, checks credentials, records each request, applies
operations the way Customer.io does (including event-id de-duplication) and injects
faults on demand::

    with FakeCustomerIO() as fake:
        fake.fail_next(status=429, retry_after=2)
        ...  # exercise code that talks to fake.url
        fake.wait_for_applied(1)

Routing is as strict as Customer.io's documented routes: an undocumented path or method,
a trailing slash (``/api/v1/customers/``), an empty segment or a different case is a 404.
Like a real web server, the fake first normalises the path (percent-encoded dots decoded,
``.`` and ``..`` segments removed, RFC 3986 section 5.2.4), so a request that climbs out of
its route lands where a server would put it; :attr:`RecordedRequest.route_path` shows it.

The server never logs request contents: tests and demos run it next to customer data.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import random
import re
import socket
import socketserver
import struct
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Literal, cast
from urllib.parse import unquote, urlsplit

from requests.structures import CaseInsensitiveDict

__all__ = [
    "BATCH_ITEM_MAX_BYTES",
    "BATCH_MAX_BYTES",
    "AppliedOperation",
    "BatchItemPredicate",
    "FakeCustomerIO",
    "RecordedRequest",
    "normalize_path",
]

logger = logging.getLogger(__name__)

BATCH_MAX_BYTES: Final = 500_000
BATCH_ITEM_MAX_BYTES: Final = 32_000

BatchItemPredicate = Callable[[int, dict[str, Any]], str | None]

_CONTROL_PREFIX: Final = "/_fake/"
_JSON: Final = "application/json"
_TEXT: Final = "text/plain; charset=utf-8"
_DEDUP_BATCH_ACTIONS: Final = frozenset({"event", "page", "screen"})
_DEDUP_OPERATIONS: Final = frozenset({"track", "track_anonymous", "pageview"})
# Generous cap on one chunk-size line so a garbage request cannot make readline() unbounded.
_MAX_LINE: Final = 65_537


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received, with the answer it chose."""

    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: bytes
    json: Any | None
    api: str
    operation: str | None
    customer_id: str | None
    authorized: bool
    status: int | None
    fault: str | None
    received_at: float
    route_path: str = ""
    """The path the fake routed on: ``path`` with dot segments resolved as a server would."""


@dataclass(frozen=True)
class AppliedOperation:
    """One operation the fake accepted and "saved" (a v2 batch yields one per good item)."""

    operation: str
    customer_id: str | None
    json: Any
    event_id: str | None
    applied_at: float
    device_id: str | None = None
    delivery_id: str | None = None


@dataclass(frozen=True)
class _Route:
    api: Literal["track", "app"]
    operation: str
    customer_id: str | None
    device_id: str | None
    has_body: bool


@dataclass(frozen=True)
class _Fault:
    label: str
    action: Literal["fail", "delay", "reset"]
    status: int = 503
    retry_after: float | None = None
    body: Any = None
    delay: float = 0.0
    message: str = "injected failure"


@dataclass(frozen=True)
class _PendingOp:
    operation: str
    customer_id: str | None
    json: Any
    event_id: str | None
    device_id: str | None = None
    delivery_id: str | None = None


@dataclass(frozen=True)
class _Outcome:
    status: int | None  # None: reset the connection instead of answering
    payload: bytes = b""
    content_type: str = _JSON
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0


_SEG = r"([^/]+)"
_SEND_CHANNELS = "email|push|sms|whatsapp|inbox_message|in_app"
# (method, path pattern, operation, api); ids are matched percent-encoded, as the SDK sends them.
_ROUTES: Final[tuple[tuple[str, re.Pattern[str], str, Literal["track", "app"]], ...]] = (
    ("PUT", re.compile(rf"/api/v1/customers/{_SEG}"), "identify", "track"),
    ("DELETE", re.compile(rf"/api/v1/customers/{_SEG}"), "delete", "track"),
    ("POST", re.compile(rf"/api/v1/customers/{_SEG}/events"), "track", "track"),
    ("POST", re.compile(r"/api/v1/events"), "track_anonymous", "track"),
    ("PUT", re.compile(rf"/api/v1/customers/{_SEG}/devices"), "add_device", "track"),
    ("DELETE", re.compile(rf"/api/v1/customers/{_SEG}/devices/{_SEG}"), "delete_device", "track"),
    ("POST", re.compile(rf"/api/v1/customers/{_SEG}/suppress"), "suppress", "track"),
    ("POST", re.compile(rf"/api/v1/customers/{_SEG}/unsuppress"), "unsuppress", "track"),
    ("POST", re.compile(r"/api/v1/merge_customers"), "merge_customers", "track"),
    ("POST", re.compile(r"/api/v2/batch"), "batch", "track"),
    ("POST", re.compile(r"/api/v2/entity"), "entity", "track"),
    ("POST", re.compile(rf"/v1/send/({_SEND_CHANNELS})"), "send", "app"),
)


def _match_route(method: str, path: str) -> _Route | None:
    for route_method, pattern, operation, api in _ROUTES:
        if route_method != method:
            continue
        match = pattern.fullmatch(path)
        if match is None:
            continue
        groups = match.groups()
        if operation == "send":
            return _Route(api, f"send_{groups[0]}", None, None, True)
        customer_id = unquote(groups[0]) if groups else None
        device_id = unquote(groups[1]) if len(groups) > 1 else None
        return _Route(api, operation, customer_id, device_id, method in ("POST", "PUT"))
    return None


_ENCODED_DOT: Final = re.compile(r"%2[eE]")


def normalize_path(path: str) -> str:
    """``path`` as a web server routes it: ``%2E`` decoded to ``.``, then dot segments removed.

    RFC 3986 section 6.2.2.2 makes a percent-encoded unreserved character equivalent to the
    character, and section 5.2.4 removes ``.`` and ``..`` segments. A trailing dot segment
    leaves a trailing slash, as the RFC says.
    """
    segments = _ENCODED_DOT.sub(".", path).split("/")[1:]
    out: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                out.append("")
        elif segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/" + "/".join(out)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _error(message: str) -> dict[str, Any]:
    return {"meta": {"error": message}}


def _retry_after_text(seconds: float) -> str:
    """Integer text for whole seconds (what clients parse most reliably), else the float."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


def _first_identifier(identifiers: Any) -> str | None:
    if isinstance(identifiers, dict) and identifiers:
        value = next(iter(identifiers.values()))
        return None if value is None else str(value)
    return None


def _event_id(value: Any) -> str | None:
    return None if value is None else str(value)


def _check_count(count: int) -> None:
    if count < 0:
        raise ValueError("count must be >= 0")


def _check_status(status: int) -> None:
    if not 100 <= status <= 599:
        raise ValueError("status must be an HTTP status code (100-599)")


def _check_seconds(name: str, value: float | None) -> None:
    if value is not None and value < 0:
        raise ValueError(f"{name} must be >= 0")


class FakeCustomerIO:
    """Customer.io Track + App API fake on a loopback HTTP server (one base URL serves both)."""

    def __init__(
        self,
        site_id: str = "test-site",
        track_api_key: str = "test-track-key",
        app_api_key: str = "test-app-key",
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ) -> None:
        self.site_id = site_id
        self.track_api_key = track_api_key
        self.app_api_key = app_api_key
        self.host = host
        self._requested_port = port
        self._rng = random.Random(seed)

        # One lock guards recording, applying and fault state; the Condition lets waiters sleep on it.
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._requests: list[RecordedRequest] = []
        self._applied: list[AppliedOperation] = []
        self._seen_event_ids: set[str] = set()
        self._generation = 0  # bumped by clear() so incremental waiters restart their scan
        self._received = 0
        self._duplicates = 0
        self._by_status: Counter[str] = Counter()
        self._by_operation: Counter[str] = Counter()
        self._applied_by_operation: Counter[str] = Counter()
        self._by_fault: Counter[str] = Counter()

        self._scripted: deque[_Fault] = deque()
        self._latency = 0.0
        self._slow_for: tuple[bytes, float] | None = None
        self._failure_rate = 0.0
        self._failure_fault: _Fault | None = None
        self._random_faults: list[tuple[float, _Fault]] = []
        self._outage: _Fault | None = None
        self._outage_until: float | None = None
        self._batch_item_predicate: BatchItemPredicate | None = None
        # Customer.io's rate limit: api -> (requests per window, window s, Retry-After s), and
        # the times of the requests it let through, per api.
        self._rate_limits: dict[str, tuple[int, float, float]] = {}
        self._rate_seen: dict[str, deque[float]] = {}

        self._lifecycle = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._bound_port: int | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeCustomerIO:
        """Bind and serve in a daemon thread; a restart after stop() reuses the same port."""
        with self._lifecycle:
            if self._server is not None:
                return self
            port = self._requested_port or self._bound_port or 0
            server = _Server((self.host, port), self)
            self._bound_port = server.server_address[1]
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # bounds how long stop() waits for the accept loop
                name=f"FakeCustomerIO:{self._bound_port}",
                daemon=True,
            )
            self._server = server
            self._thread = thread
            thread.start()
            return self

    def stop(self) -> None:
        """Stop serving and drop every open connection, idle keep-alive ones included; idempotent."""
        with self._lifecycle:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if thread is not None:
            thread.join(timeout=2.0)

    def __enter__(self) -> FakeCustomerIO:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is currently accepting connections."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound TCP port."""
        if self._bound_port is None:
            raise RuntimeError("FakeCustomerIO is not started; call start() first")
        return self._bound_port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; serves both Track and App routes."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def track_url(self) -> str:
        """Base URL for the Track API (same as :attr:`url`)."""
        return self.url

    @property
    def app_url(self) -> str:
        """Base URL for the App API (same as :attr:`url`)."""
        return self.url

    # ------------------------------------------------------------------ inspection

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received since the last clear(), in order."""
        with self._lock:
            return list(self._requests)

    @property
    def applied(self) -> list[AppliedOperation]:
        """A copy of every operation applied since the last clear(), in order."""
        with self._lock:
            return list(self._applied)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since the last clear(); control-endpoint calls are not counted."""
        with self._lock:
            return {
                "received": self._received,
                "applied": len(self._applied),
                "duplicates_ignored": self._duplicates,
                "by_status": dict(self._by_status),
                "by_operation": dict(self._by_operation),
                "applied_by_operation": dict(self._applied_by_operation),
                "by_fault": dict(self._by_fault),
            }

    def clear(self) -> None:
        """Forget recorded requests, applied operations, stats and seen event ids; keep faults."""
        with self._lock:
            self._requests = []
            self._applied = []
            self._seen_event_ids = set()
            self._generation += 1
            self._received = self._duplicates = 0
            self._by_status.clear()
            self._by_operation.clear()
            self._applied_by_operation.clear()
            self._by_fault.clear()
            self._changed.notify_all()

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        """Recorded requests for one operation (e.g. ``"identify"`` or ``"send_email"``)."""
        with self._lock:
            return [r for r in self._requests if r.operation == operation]

    def wait_for_requests(
        self, count: int, timeout: float = 10.0, operation: str | None = None
    ) -> list[RecordedRequest]:
        """Block until at least ``count`` API requests (control calls excluded) arrived; return them."""

        def wanted(r: RecordedRequest) -> bool:
            return r.api != "control" and (operation is None or r.operation == operation)

        found = self._wait(lambda: self._requests, wanted, count, timeout)
        if found is not None:
            return found
        what = f"{operation!r} requests" if operation else "requests"
        with self._lock:
            got = [r for r in self._requests if wanted(r)]
            recent = [f"{r.method} {r.operation or r.path} -> {r.status} ({r.fault})" for r in self._requests]
        raise AssertionError(
            f"FakeCustomerIO: expected at least {count} {what} within {timeout}s, got {len(got)}; "
            f"{len(recent)} recorded in total, last ones: {recent[-10:]}"
        )

    def wait_for_applied(self, count: int, timeout: float = 10.0) -> list[AppliedOperation]:
        """Block until at least ``count`` operations were applied; return them."""
        found = self._wait(lambda: self._applied, lambda _op: True, count, timeout)
        if found is not None:
            return found
        stats = self.stats
        recent = [op.operation for op in self.applied][-10:]
        raise AssertionError(
            f"FakeCustomerIO: expected at least {count} applied operations within {timeout}s, "
            f"got {stats['applied']} (duplicates ignored: {stats['duplicates_ignored']}, "
            f"requests by status: {stats['by_status']}); last applied: {recent}"
        )

    def _wait(
        self,
        source: Callable[[], list[Any]],
        wanted: Callable[[Any], bool],
        count: int,
        timeout: float,
    ) -> list[Any] | None:
        # Scan only entries appended since the last wake-up so a waiter does not hold the lock
        # for O(n) on every request during long chaos runs.
        deadline = time.monotonic() + timeout
        with self._changed:
            generation, scanned = -1, 0
            found: list[Any] = []
            while True:
                if generation != self._generation:
                    generation, scanned, found = self._generation, 0, []
                items = source()
                found.extend(item for item in items[scanned:] if wanted(item))
                scanned = len(items)
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    # ------------------------------------------------------------------ faults

    def fail_next(
        self, count: int = 1, status: int = 503, retry_after: float | None = None, body: Any = None
    ) -> None:
        """Answer the next ``count`` requests with ``status`` (queued FIFO with other scripted faults)."""
        _check_count(count)
        _check_status(status)
        _check_seconds("retry_after", retry_after)
        fault = _Fault("scripted", "fail", status, retry_after, body)
        with self._lock:
            self._scripted.extend([fault] * count)

    def timeout_next(self, count: int = 1, delay: float = 5.0) -> None:
        """Answer the next ``count`` requests normally but only after ``delay`` seconds (op is applied)."""
        _check_count(count)
        _check_seconds("delay", delay)
        fault = _Fault("timeout", "delay", delay=delay)
        with self._lock:
            self._scripted.extend([fault] * count)

    def reset_next(self, count: int = 1) -> None:
        """Reset the TCP connection (RST, no response) on the next ``count`` requests; not applied."""
        _check_count(count)
        fault = _Fault("reset", "reset")
        with self._lock:
            self._scripted.extend([fault] * count)

    def set_latency(self, seconds: float) -> None:
        """Delay every API answer by ``seconds``."""
        _check_seconds("latency", seconds)
        with self._lock:
            self._latency = float(seconds)

    def set_slow_for(self, marker: str | None, seconds: float = 0.0) -> None:
        """Delay by ``seconds`` (instead of the latency) every API request whose path or body
        contains ``marker``, e.g. one customer id, alone or among a batch's items; None stops it.
        For a poison operation: one that outlives the worker's time limit every time."""
        _check_seconds("latency", seconds)
        with self._lock:
            self._slow_for = None if marker is None else (marker.encode(), float(seconds))

    def set_failure_rate(self, rate: float, status: int = 503, retry_after: float | None = None) -> None:
        """Fail a random (seeded) fraction ``rate`` of requests with ``status``."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be between 0 and 1")
        _check_status(status)
        _check_seconds("retry_after", retry_after)
        fault = _Fault("failure_rate", "fail", status, retry_after, message="injected random failure")
        with self._lock:
            self._failure_rate = float(rate)
            self._failure_fault = fault

    def set_random_faults(
        self,
        error_rate: float = 0.0,
        statuses: Iterable[int] = (500, 502, 503, 504),
        timeout_rate: float = 0.0,
        timeout_delay: float = 5.0,
    ) -> None:
        """Chaos mix: a (seeded) random ``error_rate`` of requests fail with one of ``statuses``, and
        ``timeout_rate`` are answered (and applied) only after ``timeout_delay`` seconds."""
        codes = list(statuses)
        if not codes or error_rate < 0 or timeout_rate < 0 or error_rate + timeout_rate > 1:
            raise ValueError("rates must be >= 0 with a sum <= 1, and statuses non-empty")
        for code in codes:
            _check_status(code)
        _check_seconds("timeout_delay", timeout_delay)
        faults: list[tuple[float, _Fault]] = []
        for code in codes:
            faults.append((error_rate / len(codes), _Fault("random_error", "fail", code,
                                                           message="injected random failure")))
        if timeout_rate:
            faults.append((timeout_rate, _Fault("random_timeout", "delay", delay=timeout_delay)))
        with self._lock:
            self._random_faults = faults

    def start_outage(
        self, duration: float | None = None, status: int = 503, retry_after: float | None = None
    ) -> None:
        """Fail every request for ``duration`` seconds (None: until end_outage())."""
        _check_seconds("duration", duration)
        _check_status(status)
        _check_seconds("retry_after", retry_after)
        fault = _Fault("outage", "fail", status, retry_after, message="injected outage")
        with self._lock:
            self._outage = fault
            self._outage_until = None if duration is None else time.monotonic() + duration

    def end_outage(self) -> None:
        """End an outage started with start_outage()."""
        with self._lock:
            self._outage = None
            self._outage_until = None

    def fail_batch_items(self, predicate: BatchItemPredicate | None) -> None:
        """For each v2 batch item, a non-None ``predicate(index, item)`` makes it a 207 item error."""
        with self._lock:
            self._batch_item_predicate = predicate

    def set_rate_limit(self, requests: int | None, window: float = 1.0, api: str = "track",
                       retry_after: float = 1.0) -> None:
        """Answer 429 (with Retry-After) to requests of ``api`` ("track" or "app") beyond ``requests``
        in any sliding ``window`` seconds, as Customer.io limits a workspace; None lifts it."""
        with self._lock:
            if requests is None:
                self._rate_limits.pop(api, None)
                self._rate_seen.pop(api, None)
            else:
                _check_count(requests)
                self._rate_limits[api] = (int(requests), float(window), float(retry_after))
                self._rate_seen[api] = deque()

    def _throttled_locked(self, api: str) -> _Fault | None:
        limit = self._rate_limits.get(api)
        if limit is None:
            return None
        requests, window, retry_after = limit
        seen = self._rate_seen[api]
        now = time.monotonic()
        while seen and seen[0] <= now - window:
            seen.popleft()
        if len(seen) >= requests:
            return _Fault("rate_limited", "fail", status=429, retry_after=retry_after, message="rate limited")
        seen.append(now)
        return None

    def clear_faults(self) -> None:
        """Remove every injected fault: scripted queue, latency, failure rate, outage, batch
        predicate, rate limits."""
        with self._lock:
            self._rate_limits.clear()
            self._rate_seen.clear()
            self._scripted.clear()
            self._latency = 0.0
            self._slow_for = None
            self._failure_rate = 0.0
            self._failure_fault = None
            self._random_faults = []
            self._outage = None
            self._outage_until = None
            self._batch_item_predicate = None

    def _next_fault_locked(self) -> _Fault | None:
        if self._outage is not None:
            if self._outage_until is None or time.monotonic() < self._outage_until:
                return self._outage
            self._outage = self._outage_until = None
        if self._scripted:
            return self._scripted.popleft()
        if self._failure_fault is not None and self._failure_rate > 0:
            if self._rng.random() < self._failure_rate:
                return self._failure_fault
        if self._random_faults:
            draw = self._rng.random()
            for rate, fault in self._random_faults:
                if draw < rate:
                    return fault
                draw -= rate
        return None

    # ------------------------------------------------------------------ request processing

    def _authorized(self, api: str, headers: Mapping[str, str]) -> bool:
        scheme, _, credentials = headers.get("Authorization", "").strip().partition(" ")
        credentials = credentials.strip()
        if api == "app":
            return scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.encode(), self.app_api_key.encode()
            )
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(credentials, validate=True)
        except (binascii.Error, ValueError):
            return False
        expected = f"{self.site_id}:{self.track_api_key}".encode()
        return hmac.compare_digest(decoded, expected)

    def _process(
        self, method: str, target: str, headers: Mapping[str, str], body: bytes, received_at: float
    ) -> _Outcome:
        """Decide the answer for one request, record it and apply its operations."""
        if not target.startswith("/"):
            split = urlsplit(target)  # absolute-form request target (proxies, odd clients)
            path, query = split.path or "/", split.query
        else:
            path, _, query = target.partition("?")
        data, json_ok = _parse_json(body)
        route_path = normalize_path(path)

        def record(**kwargs: Any) -> RecordedRequest:
            return RecordedRequest(
                method=method,
                path=path,
                query=query,
                headers=headers,
                body=body,
                json=data,
                received_at=received_at,
                route_path=route_path,
                **kwargs,
            )

        if path.startswith(_CONTROL_PREFIX):
            status, response = self._control(method, path[len(_CONTROL_PREFIX) :], data, json_ok, body)
            rec = record(
                api="control", operation=None, customer_id=None, authorized=True, status=status, fault=None
            )
            self._commit(rec, [], counted=False)
            return _Outcome(status, _dumps(response))

        route = _match_route(method, route_path)
        if route is None:
            authorized = self._authorized("track", headers) or self._authorized("app", headers)
            with self._lock:
                latency = self._latency
            rec = record(
                api="unknown",
                operation=None,
                customer_id=None,
                authorized=authorized,
                status=404,
                fault="latency" if latency > 0 else None,
            )
            self._commit(rec, [])
            return _Outcome(404, _dumps(_error("not found")), delay=latency)

        operation = route.operation
        if operation == "track" and isinstance(data, dict) and data.get("type") == "page":
            operation = "pageview"
        authorized = self._authorized(route.api, headers)
        with self._lock:
            latency = self._latency
            if self._slow_for is not None and (self._slow_for[0] in body or self._slow_for[0] in path.encode()):
                latency = self._slow_for[1]
            predicate = self._batch_item_predicate
            fault = self._next_fault_locked() if authorized else None
            if fault is None and authorized:
                fault = self._throttled_locked(route.api)

        delay = latency
        answer: int | None
        extra_headers: tuple[tuple[str, str], ...] = ()
        content_type = _JSON
        pending: list[_PendingOp] = []
        if not authorized:
            answer, payload = 401, _dumps(_error("unauthorized"))
        elif fault is not None and fault.action == "fail":
            answer = fault.status
            payload, content_type = _fault_payload(fault)
            if fault.retry_after is not None:
                extra_headers = (("Retry-After", _retry_after_text(fault.retry_after)),)
        elif fault is not None and fault.action == "reset":
            answer, payload = None, b""
        else:
            answer, response, pending = self._handle(route, operation, body, data, json_ok, predicate)
            payload = _dumps(response)
            if fault is not None:
                delay += fault.delay
        label = fault.label if fault is not None else ("latency" if latency > 0 else None)
        rec = record(
            api=route.api,
            operation=operation,
            customer_id=route.customer_id,
            authorized=authorized,
            status=answer,
            fault=label,
        )
        self._commit(rec, pending)
        return _Outcome(answer, payload, content_type, extra_headers, delay)

    def _handle(
        self,
        route: _Route,
        operation: str,
        body: bytes,
        data: Any,
        json_ok: bool,
        predicate: BatchItemPredicate | None,
    ) -> tuple[int, Any, list[_PendingOp]]:
        """Normal (fault-free) handling: validate and turn the request into pending operations."""
        if operation == "batch" and len(body) > BATCH_MAX_BYTES:
            return 413, _error(f"request body exceeds {BATCH_MAX_BYTES} bytes"), []
        if route.has_body:
            if not json_ok:
                return 400, _error("invalid json"), []
            if not isinstance(data, dict):
                return 400, _error("body must be a JSON object"), []
        body_dict: dict[str, Any] = data if isinstance(data, dict) else {}
        if operation == "batch":
            return _handle_batch(body_dict, predicate)
        if operation == "entity":
            return _handle_entity(body_dict)
        if operation.startswith("send_"):
            delivery_id = f"fake-{uuid.uuid4().hex}"
            op = _PendingOp(
                operation,
                _first_identifier(body_dict.get("identifiers")),
                body_dict,
                None,
                delivery_id=delivery_id,
            )
            return 200, {"delivery_id": delivery_id, "queued_at": int(time.time())}, [op]
        customer_id = route.customer_id
        if operation == "merge_customers":
            customer_id = _first_identifier(body_dict.get("primary"))
        device_id = route.device_id
        if operation == "add_device":
            device = body_dict.get("device")
            device_id = _event_id(device.get("id")) if isinstance(device, dict) else None
        event_id = _event_id(body_dict.get("id")) if operation in _DEDUP_OPERATIONS else None
        json_value = data if data is not None else {}
        return 200, {}, [_PendingOp(operation, customer_id, json_value, event_id, device_id=device_id)]

    def _commit(self, record: RecordedRequest, pending: Iterable[_PendingOp], counted: bool = True) -> None:
        with self._lock:
            now = time.monotonic()
            for op in pending:
                if op.event_id is not None:
                    # Customer.io ignores an event whose id it already received (but still answers 200).
                    if op.event_id in self._seen_event_ids:
                        self._duplicates += 1
                        continue
                    self._seen_event_ids.add(op.event_id)
                self._applied.append(
                    AppliedOperation(
                        op.operation, op.customer_id, op.json, op.event_id, now, op.device_id, op.delivery_id
                    )
                )
                self._applied_by_operation[op.operation] += 1
            self._requests.append(record)
            if counted:
                self._received += 1
                self._by_status["no_response" if record.status is None else str(record.status)] += 1
                self._by_operation[record.operation or "unknown"] += 1
                if record.fault is not None:
                    self._by_fault[record.fault] += 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ control endpoints

    def _control(self, method: str, name: str, data: Any, json_ok: bool, body: bytes) -> tuple[int, Any]:
        """Cross-process control API under /_fake/ (no auth, no faults, not counted in stats)."""
        if body.strip() and not json_ok:
            return 400, _error("invalid json")
        args: dict[str, Any] = data if isinstance(data, dict) else {}
        try:
            if method == "GET" and name == "stats":
                return 200, self.stats
            if method == "GET" and name == "applied":
                return 200, [
                    {
                        "operation": op.operation,
                        "customer_id": op.customer_id,
                        "event_id": op.event_id,
                        "json": op.json,
                        "device_id": op.device_id,
                        "delivery_id": op.delivery_id,
                    }
                    for op in self.applied
                ]
            if method == "GET" and name == "requests":
                return 200, [
                    {
                        "method": r.method,
                        "path": r.path,
                        "route_path": r.route_path,
                        "api": r.api,
                        "operation": r.operation,
                        "customer_id": r.customer_id,
                        "authorized": r.authorized,
                        "status": r.status,
                        "fault": r.fault,
                    }
                    for r in self.requests
                    if r.api != "control"
                ]
            if method != "POST":
                return 404, _error("not found")
            if name == "outage":
                self.start_outage(
                    _opt_float(args, "duration"), _int(args, "status", 503), _opt_float(args, "retry_after")
                )
            elif name == "end_outage":
                self.end_outage()
            elif name == "fail_next":
                self.fail_next(
                    _int(args, "count", 1),
                    _int(args, "status", 503),
                    _opt_float(args, "retry_after"),
                    args.get("body"),
                )
            elif name == "timeout_next":
                self.timeout_next(_int(args, "count", 1), _opt_float(args, "delay") or 5.0)
            elif name == "reset_next":
                self.reset_next(_int(args, "count", 1))
            elif name == "latency":
                self.set_latency(_opt_float(args, "seconds") or 0.0)
            elif name == "failure_rate":
                self.set_failure_rate(
                    _opt_float(args, "rate") or 0.0,
                    _int(args, "status", 503),
                    _opt_float(args, "retry_after"),
                )
            elif name == "clear":
                self.clear()
            elif name == "clear_faults":
                self.clear_faults()
            else:
                return 404, _error("not found")
        except (TypeError, ValueError) as exc:
            return 400, _error(str(exc))
        return 200, {"ok": True}


def _opt_float(args: Mapping[str, Any], key: str) -> float | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{key} must be a number or null")
    return float(value)


def _int(args: Mapping[str, Any], key: str, default: int) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} must be an integer")
    return value


def _parse_json(body: bytes) -> tuple[Any, bool]:
    if not body:
        return None, False
    try:
        return json.loads(body), True
    except (ValueError, RecursionError):
        return None, False


def _fault_payload(fault: _Fault) -> tuple[bytes, str]:
    if fault.body is None:
        return _dumps(_error(fault.message)), _JSON
    if isinstance(fault.body, bytes):
        return fault.body, _TEXT
    if isinstance(fault.body, str):
        return fault.body.encode("utf-8"), _TEXT
    return _dumps(fault.body), _JSON


def _handle_batch(
    data: dict[str, Any], predicate: BatchItemPredicate | None
) -> tuple[int, Any, list[_PendingOp]]:
    items = data.get("batch")
    if not isinstance(items, list):
        return 400, _error("batch must be a list of operations"), []
    errors: list[dict[str, Any]] = []
    pending: list[_PendingOp] = []
    for index, item in enumerate(items):
        problem: tuple[str, str, str] | None = None
        if not isinstance(item, dict):
            problem = ("invalid", "", "operation must be a JSON object")
        elif len(_dumps(item)) > BATCH_ITEM_MAX_BYTES:
            problem = ("size_limit", "", f"operation exceeds {BATCH_ITEM_MAX_BYTES} bytes")
        elif (problem := check_v2_item(item)) is not None:
            pass
        elif predicate is not None:
            reason = predicate(index, item)
            if reason is not None:
                problem = (reason, "", "injected item failure")
        if problem is not None:
            reason, field, message = problem
            errors.append({"batch_index": index, "reason": reason, "field": field, "message": message})
            continue
        item_dict = cast(dict[str, Any], item)
        action = str(item_dict["action"])
        event_id = _event_id(item_dict.get("id")) if action in _DEDUP_BATCH_ACTIONS else None
        who = item_dict.get("primary") if action == "merge" else item_dict.get("identifiers")
        pending.append(_PendingOp(f"batch:{action}", _first_identifier(who), item_dict, event_id))
    if errors:
        return 207, {"errors": errors}, pending
    return 200, {}, pending


# The v2 person operations (Track API v2 OpenAPI, ``person_*`` schemas) and what each requires.
_V2_PERSON_ACTIONS: Final = {
    "identify": (), "delete": (), "suppress": (), "unsuppress": (),
    "event": ("name",), "page": ("name",), "screen": ("name",),
    "add_device": ("device",), "delete_device": ("device",),
    "merge": ("primary", "secondary"),
    "add_relationships": ("cio_relationships",), "delete_relationships": ("cio_relationships",),
}
_V2_IDENTIFIERS: Final = frozenset({"id", "email", "cio_id"})
_V2_OBJECT_ACTIONS: Final = frozenset(
    {"identify", "identify_anonymous", "delete", "add_relationships", "delete_relationships"}
)


def _one_identifier(value: Any, allowed: frozenset[str]) -> str | None:
    """Why ``value`` is not exactly one non-blank identifier among ``allowed`` (None: it is)."""
    if not isinstance(value, dict) or len(value) != 1:
        return "must hold exactly one identifier"
    (name, ident), = value.items()
    if name not in allowed:
        return f"identifier {name!r} is not one of {sorted(allowed)}"
    if not isinstance(ident, (str, int)) or isinstance(ident, bool) or str(ident).strip() == "":
        return "identifier must be a non-blank string or number"
    return None


def check_v2_item(item: dict[str, Any]) -> tuple[str, str, str] | None:
    """Why Customer.io would refuse one v2 batch/entity operation: (reason, field, message)."""
    kind, action = item.get("type"), item.get("action")
    if kind is None:
        return ("required", "type", "type is required")
    if action is None:
        return ("required", "action", "action is required")
    if kind == "object":
        return _check_v2_object(item, action)
    if kind == "delivery":
        return _check_v2_delivery(item, action)
    if kind != "person":
        return ("invalid", "type", "type must be person, object or delivery")
    if action not in _V2_PERSON_ACTIONS:
        return ("invalid", "action", f"unknown person action {action!r}")
    for field in _V2_PERSON_ACTIONS[action]:
        if field not in item:
            return ("required", field, f"{field} is required for {action}")
    if action == "merge":
        for side in ("primary", "secondary"):
            problem = _one_identifier(item.get(side), _V2_IDENTIFIERS)
            if problem:
                return ("invalid", side, problem)
        if "identifiers" in item:
            return ("invalid", "identifiers", "merge takes primary and secondary, not identifiers")
    else:
        allowed = _V2_IDENTIFIERS | {"anonymous_id"} if action in _DEDUP_BATCH_ACTIONS else _V2_IDENTIFIERS
        problem = _one_identifier(item.get("identifiers"), allowed)
        if problem:
            return ("invalid", "identifiers", problem)
    if action in _DEDUP_BATCH_ACTIONS:
        if not isinstance(item.get("name"), str) or not item["name"]:
            return ("invalid", "name", "name must be a non-empty string")
        if "id" in item and not isinstance(item["id"], str):
            return ("invalid", "id", "id must be a string (a ULID)")
        if "timestamp" in item and (not isinstance(item["timestamp"], int) or isinstance(item["timestamp"], bool)):
            return ("invalid", "timestamp", "timestamp must be a unix time in seconds")
    if action in ("add_device", "delete_device"):
        device = item.get("device")
        if not isinstance(device, dict) or not isinstance(device.get("token"), str) or not device["token"]:
            return ("invalid", "device", "device.token is required")
        if "platform" in device and device["platform"] not in ("ios", "android"):
            return ("invalid", "device", "device.platform must be ios or android")
        if action == "add_device" and "platform" not in device:
            return ("required", "device", "device.platform is required for add_device")
    if "attributes" in item and not isinstance(item["attributes"], dict):
        return ("invalid", "attributes", "attributes must be an object")
    return None


def _check_v2_object(item: dict[str, Any], action: Any) -> tuple[str, str, str] | None:
    """The v2 ``object_*`` schemas: an action among five, identified by type and id or by cio_object_id."""
    if action not in _V2_OBJECT_ACTIONS:
        return ("invalid", "action", f"unknown object action {action!r}")
    ids = item.get("identifiers")
    if not isinstance(ids, dict) or sorted(ids) not in (["object_id", "object_type_id"], ["cio_object_id"]):
        return ("invalid", "identifiers", "object_type_id and object_id, or cio_object_id, are required")
    if not all(isinstance(v, str) and v.strip() for v in ids.values()):
        return ("invalid", "identifiers", "object identifiers must be non-blank strings")
    if action in ("add_relationships", "delete_relationships") and not item.get("cio_relationships"):
        return ("required", "cio_relationships", f"cio_relationships is required for {action}")
    return None


def _check_v2_delivery(item: dict[str, Any], action: Any) -> tuple[str, str, str] | None:
    """The v2 ``delivery`` schema: an event naming a metric, for a delivery id, with the device token."""
    if action != "event":
        return ("invalid", "action", "a delivery operation's action is event")
    ids = item.get("identifiers")
    if not isinstance(ids, dict) or list(ids) != ["id"] or not isinstance(ids["id"], str) or not ids["id"].strip():
        return ("invalid", "identifiers", "identifiers.id (the delivery id) is required")
    if item.get("name") not in ("opened", "converted", "delivered"):
        return ("invalid", "name", "name must be opened, converted or delivered")
    attributes = item.get("attributes")
    if not isinstance(attributes, dict) or not isinstance(attributes.get("device_token"), str):
        return ("required", "attributes", "attributes.device_token is required")
    return None


def _handle_entity(data: dict[str, Any]) -> tuple[int, Any, list[_PendingOp]]:
    """``POST /api/v2/entity``: one operation shaped like a v2 batch item."""
    problem = check_v2_item(data)
    if problem is not None:
        reason, field, message = problem
        return 400, {"errors": [{"reason": reason, "field": field, "message": message}]}, []
    if len(_dumps(data)) > BATCH_ITEM_MAX_BYTES:
        return 400, {"errors": [{"reason": "size_limit", "field": "", "message": "operation too large"}]}, []
    action = str(data["action"])
    event_id = _event_id(data.get("id")) if action in _DEDUP_BATCH_ACTIONS else None
    return 200, {}, [_PendingOp(f"entity:{action}", _first_identifier(data.get("identifiers")), data, event_id)]


class _BadRequestError(Exception):
    """The request framing is broken; answer 400 and close the connection."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # stop() drops connections itself; joining handler threads here could wait on a sleeping fault.
    block_on_close = False
    # Several worker processes opening pools at once overflow the default backlog of 5 (SYN retries cost 1 s).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], fake: FakeCustomerIO) -> None:
        self.fake = fake
        self.closing = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can stall for
        # seconds in sandboxes; the name is only used for CGI-style environments we never need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def track(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(connection)
            closing = self.closing.is_set()
        if closing:
            _shutdown_quietly(connection)

    def untrack(self, connection: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Wake every handler: blocked reads return EOF and fault sleeps end."""
        with self._connections_lock:
            self.closing.set()
            connections = list(self._connections)
        for connection in connections:
            _shutdown_quietly(connection)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # client went away or stop() closed the socket: routine for a fake server
        # Type name only: messages and tracebacks could carry request data into logs.
        logger.error("FakeCustomerIO connection handler failed: %s", type(exc).__name__)
        logger.debug("FakeCustomerIO handler traceback", exc_info=True)


def _shutdown_quietly(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed or reset


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeCustomerIO/1.0"
    # Headers and body go out in separate writes; without TCP_NODELAY the client's delayed ACK adds ~40 ms.
    disable_nagle_algorithm = True
    error_content_type = _JSON
    error_message_format = '{"meta":{"error":"%(message)s"}}'

    @property
    def _server(self) -> _Server:
        return cast(_Server, self.server)

    def version_string(self) -> str:
        return self.server_version  # no Python version: nothing to fingerprint in a test server

    def setup(self) -> None:
        super().setup()
        self._server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: request lines carry customer ids."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        try:
            body = self._read_body()
        except _BadRequestError as exc:
            self.close_connection = True
            self._send(400, _dumps(_error(str(exc))), _JSON, ())
            return
        except (OSError, EOFError):
            self.close_connection = True  # client vanished mid-body; nothing to answer
            return
        received_at = time.monotonic()
        headers: CaseInsensitiveDict[str] = CaseInsensitiveDict(list(self.headers.items()))
        try:
            outcome = self._server.fake._process(self.command, self.path, headers, body, received_at)
        except Exception as exc:
            # A bug in the fake (or in a user's batch predicate) must answer, not hang the client.
            logger.error("FakeCustomerIO failed to process a request: %s", type(exc).__name__)
            logger.debug("FakeCustomerIO traceback", exc_info=True)
            self._send(500, _dumps(_error("fake internal error")), _JSON, ())
            return
        if outcome.delay > 0 and self._server.closing.wait(outcome.delay):
            self.close_connection = True  # stop() was called while we slept; the socket is gone
            return
        if outcome.status is None:
            self._reset()
            return
        self._send(outcome.status, outcome.payload, outcome.content_type, outcome.headers)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            return b""
        try:
            length = int(length_text)
        except ValueError:
            raise _BadRequestError("invalid Content-Length") from None
        if length < 0:
            raise _BadRequestError("invalid Content-Length")
        return self._read_exact(length)

    def _read_exact(self, length: int) -> bytes:
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            raise EOFError("connection closed before the body was complete")
        return data

    def _read_chunked(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            line = self.rfile.readline(_MAX_LINE)
            if not line:
                raise EOFError("connection closed inside a chunked body")
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadRequestError("invalid chunk size") from None
            if size == 0:
                while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                    pass  # skip trailers
                return b"".join(chunks)
            chunks.append(self._read_exact(size))
            self.rfile.readline(_MAX_LINE)  # CRLF after the chunk

    def _send(
        self, status: int, payload: bytes, content_type: str, headers: tuple[tuple[str, str], ...]
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        """Abort the connection with an RST and no response at all."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone: the client sees a dropped connection either way
        # rfile holds a reference to the socket (makefile), so close it first or close() would not
        # release the descriptor and the RST would only go out much later.
        self.rfile.close()
        self.connection.close()
