"""Property: whatever a caller passes to any operation, the call either raises ValidationError
at enqueue with nothing published, or is delivered by a real worker to the fake, once, at the
route the operation documents. Never a worker crash, never a dead letter (``internal:`` or any).

Arbitrary JSON-like payloads: deep (past the nesting limit), wide (past the attribute count),
huge (past the size limits), odd unicode (lone surrogates, NUL, bidi controls, astral),
odd floats (nan, inf, -0.0, subnormal, huge), bytes, sets, reserved names (``self``, ``_cio``,
parameter names, Customer.io field names), odd ids (dot segments, slashes, percent signs,
unicode, blanks, huge ints, bools) and odd publish-free arguments.

Examples: ``CIO_HOSTILE_EXAMPLES`` (default 2000; CI runs the default). The run prints how many
calls were refused and how many delivered, by operation.
"""

from __future__ import annotations

import math
import os
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import customerio
import pytest
import redis
from celery import signals
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cio_celery
from cio_celery import ValidationError
from cio_celery.client import ROUTES
from cio_celery.deadletters import DeadLetters
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.validation import MAX_NESTING_DEPTH, OPERATIONS, PATH_ID_FIELDS, normalize

EXAMPLES = int(os.environ.get("CIO_HOSTILE_EXAMPLES", "2000"))
ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"

# -- values ------------------------------------------------------------------------------------

ODD_TEXT = [
    "", " ", ".", "..", "...", "a/..", "../x", "%2E%2E", "%", "%25", "?q=1", "#frag", "a b", "\t",
    "\x00", "\u202e", "\u200b", "\ufeff", "é", "😀", "\U0010ffff", "\ud800", "a\udfffb", "\\..",
    "ada.lovelace@example.com", "a" * 150, "é" * 76, "x" * 1001,
]
RESERVED = ["self", "_cio", "id", "customer_id", "name", "data", "page", "timestamp", "device_id", "platform",
            "type", "action", "identifiers", "__class__", "__dict__", "request", "args", "kwargs", "", " "]
ODD_FLOATS = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, 1e16, 0.1]


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


texts = st.one_of(st.text(max_size=24), st.sampled_from(ODD_TEXT))
keys = st.one_of(st.text(max_size=12), st.sampled_from(RESERVED + ODD_TEXT[:20]), st.integers(-3, 3))
scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**70), 2**70), st.sampled_from([2**200, -(10**160)]),
    st.just(4400).map(lambda n: 10**n),  # past int -> str's digit limit (not repr-able by hypothesis)
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(ODD_FLOATS),
    texts,
    st.binary(max_size=8), st.frozensets(st.integers(0, 3), max_size=2),
    st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1),
                 timezones=st.none() | st.just(timezone.utc)),
)
json_like = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4)
    | st.tuples(inner, inner) | st.sets(st.integers(0, 9), max_size=2),
    max_leaves=12,
)
deep = st.integers(MAX_NESTING_DEPTH - 3, MAX_NESTING_DEPTH + 8).map(nested)
wide = st.integers(250, 320).map(lambda n: {f"k{i}": i for i in range(n)})
huge = st.sampled_from([900, 1001, 40_000, 100_010, 120_000]).map(lambda n: "h" * n)
values = st.one_of(json_like, json_like, json_like, deep, huge)
data_dicts = st.one_of(st.dictionaries(keys, values, max_size=5), wide, deep.map(lambda d: {"d": d}))
ids = st.one_of(
    st.text(min_size=1, max_size=20), st.sampled_from(ODD_TEXT), st.integers(-(10**20), 10**20),
    st.sampled_from([True, None, 10**151, 1.5, b"u1", ["u"]]),
)
timestamps = st.one_of(st.integers(-5, 10**10 + 5), st.sampled_from(["1700000000", "soon", 1.7e9, math.nan]),
                       st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2300, 1, 1)))
identifiers = st.one_of(
    st.fixed_dictionaries({"id": ids}), st.fixed_dictionaries({"email": texts}),
    st.fixed_dictionaries({"cio_id": texts}), st.dictionaries(keys, ids, max_size=2),
)


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    op = draw(st.sampled_from(OPERATIONS))

    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.none() | strategy)

    if op == "identify":
        return op, (draw(ids),), draw(data_dicts)
    if op in ("track", "track_anonymous"):
        args = (draw(ids), draw(texts), maybe(data_dicts), maybe(st.just(ULID) | texts), maybe(timestamps))
        return op, args, {}
    if op == "pageview":
        return op, (draw(ids), draw(texts)), draw(data_dicts)
    if op == "backfill":
        return op, (draw(ids), draw(texts), draw(timestamps)), draw(data_dicts)
    if op in ("delete", "suppress", "unsuppress"):
        return op, (draw(ids),), {}
    if op == "add_device":
        return op, (draw(ids), draw(ids), draw(st.sampled_from(["ios", "android", "web"]))), draw(data_dicts)
    if op == "delete_device":
        return op, (draw(ids), draw(ids)), {}
    if op == "merge_customers":
        types = st.sampled_from(["id", "email", "cio_id", "phone"])
        return op, (draw(types), draw(ids), draw(types), draw(ids)), {}
    if op == "batch":
        # Each type with its documented actions (mostly), its identifiers (mostly) and hostile extras.
        object_ids = st.one_of(
            st.fixed_dictionaries({"object_type_id": texts, "object_id": texts}),
            st.fixed_dictionaries({"cio_object_id": texts}), identifiers,
        )
        relationships = st.lists(st.fixed_dictionaries({"identifiers": object_ids}), max_size=2) | values
        person = st.fixed_dictionaries(
            {"type": st.just("person"),
             "action": st.sampled_from(["identify", "event", "page", "merge", "delete", "add_relationships", ""])
             | texts},
            optional={"identifiers": identifiers, "primary": identifiers, "secondary": identifiers,
                      "name": texts, "id": st.just(ULID) | texts, "timestamp": timestamps,
                      "attributes": data_dicts, "cio_relationships": relationships},
        )
        obj = st.fixed_dictionaries(
            {"type": st.just("object"),
             "action": st.sampled_from(["identify", "identify_anonymous", "delete", "delete_relationships", "page"])
             | texts, "identifiers": object_ids},
            optional={"attributes": data_dicts, "cio_relationships": relationships, "timestamp": timestamps},
        )
        delivery = st.fixed_dictionaries(
            {"type": st.just("delivery"), "action": st.sampled_from(["event", "event", "identify"]),
             "identifiers": st.fixed_dictionaries({"id": texts}) | identifiers,
             "name": st.sampled_from(["opened", "converted", "delivered", "clicked"]) | texts},
            optional={"attributes": st.fixed_dictionaries({"device_token": texts}) | data_dicts},
        )
        bogus = st.fixed_dictionaries({"type": texts | st.just("bogus"), "action": texts}, optional={"x": values})
        # Well-formed operations with hostile attributes, so that some batches are delivered.
        good = st.one_of(
            st.builds(lambda i, a: {"type": "person", "action": "identify", "identifiers": {"id": i},
                                    "attributes": a}, st.text("abc123", min_size=1, max_size=8), data_dicts),
            st.builds(lambda t, a: {"type": "object", "action": "identify",
                                    "identifiers": {"object_type_id": "1", "object_id": t}, "attributes": a},
                      st.text("xyz", min_size=1, max_size=8), data_dicts),
            st.builds(lambda n: {"type": "delivery", "action": "event", "identifiers": {"id": "dlv1"},
                                 "name": n, "attributes": {"device_token": "tok"}},
                      st.sampled_from(["opened", "converted", "delivered"])),
        )
        operation = st.one_of(good, good, good, person, obj, delivery, bogus)
        return op, (draw(st.lists(operation, min_size=0, max_size=4)),), {}
    request = draw(st.fixed_dictionaries(
        {"transactional_message_id": st.integers(0, 10**6) | texts, "identifiers": identifiers},
        optional={"message_data": data_dicts, "to": texts, "custom_data": values, "attachments": data_dicts,
                  "send_at": timestamps},
    ))
    if draw(st.booleans()) and op == "send_email":
        try:
            request = customerio.SendEmailRequest(**{k: v for k, v in request.items() if k != "attachments"})
        except TypeError:
            pass
    return op, (request,), {}


# -- the worker side ---------------------------------------------------------------------------


class Watch:
    """Publishes, finished tasks and failures seen by the embedded worker (signals, in-process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.published: list[str] = []
        self.done: dict[str, threading.Event] = {}
        self.failures: list[str] = []

    def event(self, task_id: str) -> threading.Event:
        with self.lock:
            return self.done.setdefault(task_id, threading.Event())

    def on_publish(self, sender: Any = None, headers: Any = None, **_: Any) -> None:
        with self.lock:
            self.published.append(str((headers or {}).get("id")))

    def on_postrun(self, task_id: str | None = None, **_: Any) -> None:
        if task_id:
            self.event(task_id).set()

    def on_failure(self, task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
        with self.lock:
            self.failures.append(f"{task_id}: {type(exception).__name__}")


@pytest.fixture()
def watch() -> Iterator[Watch]:
    w = Watch()
    signals.before_task_publish.connect(w.on_publish, weak=False)
    signals.task_postrun.connect(w.on_postrun, weak=False)
    signals.task_failure.connect(w.on_failure, weak=False)
    yield w
    signals.before_task_publish.disconnect(w.on_publish)
    signals.task_postrun.disconnect(w.on_postrun)
    signals.task_failure.disconnect(w.on_failure)


def expected_route(op: str, nargs: tuple[Any, ...]) -> tuple[str, str]:
    method, template = ROUTES[op]
    path = template
    for field in PATH_ID_FIELDS.get(op, ()):
        index = ("customer_id", "device_id").index(field) if op in ("add_device", "delete_device") else 0
        path = path.replace("{id}", quote(str(nargs[index]), safe=""), 1)
    return method, path


def test_every_call_is_refused_at_enqueue_or_delivered_once_at_its_route(
    worker_app: Any, fake: FakeCustomerIO, watch: Watch, store: redis.Redis
) -> None:
    dead_letters = DeadLetters(settings_for_app(worker_app), worker_app)
    tally: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(calls())
    def check(call: tuple[str, tuple[Any, ...], dict[str, Any]]) -> None:
        op, args, kwargs = call
        task = getattr(cio_celery, op)
        # Each example starts clean, so a failure is pinned on the call that caused it.
        fake.clear()
        store.flushdb()
        watch.failures.clear()
        before = len(watch.published)
        try:
            result = task.apply_async(args, kwargs)
        except ValidationError as exc:
            assert len(watch.published) == before, "published although refused"
            assert exc.operation == op and exc.field
            tally[f"{op}:refused"] += 1
            return
        assert len(watch.published) == before + 1 and watch.published[-1] == result.id
        assert watch.event(result.id).wait(30), f"{op} not run by the worker within 30 s"
        entries = dead_letters.list()
        assert entries == [], [(e.operation, e.reason) for e in entries]
        assert watch.failures == []
        [request] = fake.requests  # delivered once
        assert request.status == 200, (op, request.status)
        nargs, _ = normalize(op, args, {k: v for k, v in kwargs.items()})
        method, path = expected_route(op, nargs)
        assert (request.method, request.path) == (method, path), op
        assert request.route_path == request.path, "a dot segment was resolved on the way"
        tally[f"{op}:delivered"] += 1

    check()
    refused = sum(n for k, n in tally.items() if k.endswith(":refused"))
    delivered = sum(n for k, n in tally.items() if k.endswith(":delivered"))
    print(f"\nhostile property: {refused + delivered} calls, {refused} refused at enqueue, {delivered} delivered; "
          + ", ".join(f"{k} {n}" for k, n in sorted(tally.items())))
    # The generator reaches both outcomes for every operation (a test that only ever refuses
    # would prove nothing about delivery).
    for op in OPERATIONS:
        assert tally[f"{op}:delivered"] > 0 or EXAMPLES < 200, f"{op} never delivered"
        assert tally[f"{op}:refused"] > 0 or EXAMPLES < 200, f"{op} never refused"
