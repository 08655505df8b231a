"""Batch delivery of a parked backlog through /api/v2/batch: packing, per-item idempotency,
207 partial failures, retries, and a refused batch split back into single operations."""

from __future__ import annotations

import time
import uuid
from typing import Any

from cio_celery.batching import BATCH_MAX_BYTES, pack, to_v2
from cio_celery.deadletters import DeadLetters
from cio_celery.fallback import Fallback
from cio_celery.idempotency import Claims
from cio_celery.settings import settings_for_app
from cio_celery.testing import FakeCustomerIO
from cio_celery.ulid import new_ulid


def parked_track(i: int, blob: str = "") -> dict[str, Any]:
    """A parked ``track`` entry as a worker writes it (normalised args, metadata in kwargs)."""
    task_id = str(uuid.uuid4())
    data = {"seq": i, **({"blob": blob} if blob else {})}
    return {"operation": "track", "task_id": task_id, "args": [f"user-{i}", "chaos", data, new_ulid(), None],
            "kwargs": {"_cio": {"key": task_id, "enqueued_at": time.time()}}}


def test_v2_forms() -> None:
    assert to_v2("identify", ("u1",), {"plan": "pro"}, None) == {
        "type": "person", "identifiers": {"id": "u1"}, "action": "identify", "attributes": {"plan": "pro"}}
    event = to_v2("track", ("u1", "ev", {"a": 1}, "01HZZZZZZZZZZZZZZZZZZZZZZZ", 1700000000), {}, None)
    assert event == {"type": "person", "identifiers": {"id": "u1"}, "action": "event", "name": "ev",
                     "attributes": {"a": 1}, "id": "01HZZZZZZZZZZZZZZZZZZZZZZZ", "timestamp": 1700000000}
    page = to_v2("pageview", ("u1", "/pricing"), {"ref": "x"}, "01HZZZZZZZZZZZZZZZZZZZZZZZ")
    assert page["action"] == "page" and page["name"] == "/pricing" and page["id"]
    assert to_v2("suppress", ("u1",), {}, None)["action"] == "suppress"


def test_pack_respects_sizes_and_leaves_sends_alone() -> None:
    entries = [parked_track(i, blob="x" * 20_000) for i in range(60)]
    send = {"operation": "send_email", "task_id": "t", "args": [{"transactional_message_id": 1,
                                                                 "identifiers": {"id": "u"}}], "kwargs": {}}
    packed = pack([*entries[:30], send, *entries[30:]])
    assert packed.singles == [send]
    assert sum(len(b) for b in packed.batches) == 60
    assert len(packed.batches) == 3  # 60 x ~20 KB does not fit in 2 x 500 KB
    import json

    for batch in packed.batches:
        body = json.dumps({"batch": [to_v2("track", tuple(e["args"]), {}, None) for e in batch]},
                          separators=(",", ":"))
        assert len(body) <= BATCH_MAX_BYTES
    assert [len(b) for b in pack(entries[:10], max_items=4).batches] == [4, 4, 2]
    # An item over 32 KB goes alone (Customer.io would refuse it inside a batch).
    assert len(pack([parked_track(1, blob="y" * 40_000)]).singles) == 1


def release_batched(app: Any, entries: list[dict[str, Any]]) -> None:
    fallback = Fallback(settings_for_app(app), app)
    for e in entries:
        fallback.park(e["operation"], e["task_id"], e["args"], e["kwargs"])
    assert fallback.release(len(entries), batch=True) == len(entries)


def applied_seqs(fake: FakeCustomerIO) -> list[int]:
    return sorted(int(a.json["attributes"]["seq"]) for a in fake.applied if a.operation == "batch:event")


def test_a_backlog_goes_in_few_requests_each_applied_once(worker_app: Any, fake: FakeCustomerIO) -> None:
    entries = [parked_track(i) for i in range(300)]
    release_batched(worker_app, entries)
    fake.wait_for_applied(300, timeout=30)
    assert applied_seqs(fake) == list(range(300))
    assert len(fake.requests) == 1  # 300 small events: one request
    claims = Claims(settings_for_app(worker_app))
    deadline = time.monotonic() + 10  # the done marks follow the answer
    while claims.state_of("track", entries[-1]["task_id"]) != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert {claims.state_of("track", e["task_id"]) for e in entries} == {"done"}


def test_items_already_delivered_are_not_sent_again(worker_app: Any, fake: FakeCustomerIO) -> None:
    entries = [parked_track(i) for i in range(10)]
    release_batched(worker_app, entries[:4])
    fake.wait_for_applied(4, timeout=20)
    release_batched(worker_app, entries)  # a crashed releaser published the first four again
    fake.wait_for_applied(10, timeout=20)
    time.sleep(0.5)
    assert applied_seqs(fake) == list(range(10))
    second = fake.requests[-1].json
    assert len(second["batch"]) == 6
    assert Claims(settings_for_app(worker_app)).suppressed().get("track") == 4


def test_a_207_dead_letters_only_the_failed_items(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_batch_items(lambda index, item: "invalid" if item["attributes"]["seq"] in (2, 5) else None)
    entries = [parked_track(i) for i in range(8)]
    release_batched(worker_app, entries)
    letters = DeadLetters(settings_for_app(worker_app), worker_app)
    deadline = time.monotonic() + 20
    while letters.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    fake.wait_for_applied(6, timeout=20)
    assert applied_seqs(fake) == [0, 1, 3, 4, 6, 7]
    dead = sorted(letters.list(), key=lambda d: d.args[2]["seq"])
    assert [(d.args[2]["seq"], d.reason, d.status) for d in dead] == [(2, "batch:invalid", 207),
                                                                        (5, "batch:invalid", 207)]
    # A replayed item goes alone and is delivered.
    fake.fail_batch_items(None)
    assert letters.replay() == 2
    fake.wait_for_applied(8, timeout=20)
    assert sorted(int(a.json["data"]["seq"]) for a in fake.applied if a.operation == "track") == [2, 5]


def test_a_transient_failure_retries_the_batch(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(1, status=503)
    release_batched(worker_app, [parked_track(i) for i in range(5)])
    fake.wait_for_applied(5, timeout=20)
    assert [r.status for r in fake.requests] == [503, 200]
    assert applied_seqs(fake) == list(range(5))


def test_a_refused_batch_is_split_into_single_operations(worker_app: Any, fake: FakeCustomerIO) -> None:
    fake.fail_next(1, status=400)
    release_batched(worker_app, [parked_track(i) for i in range(3)])
    fake.wait_for_applied(3, timeout=20)
    assert [r.operation for r in fake.requests] == ["batch", "track", "track", "track"]
    assert sorted(a.json["data"]["seq"] for a in fake.applied) == [0, 1, 2]


def test_an_open_breaker_parks_the_batch_again(worker_app: Any, fake: FakeCustomerIO) -> None:
    from cio_celery.breaker import Breaker

    settings = settings_for_app(worker_app)
    breaker = Breaker(settings)
    fallback = Fallback(settings, worker_app)
    breaker.open()
    try:
        release_batched(worker_app, [parked_track(i) for i in range(4)])
        deadline = time.monotonic() + 10
        while fallback.depth() < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fallback.depth() == 4
        assert fake.requests == []
    finally:
        breaker.reset()
    assert fallback.release(4, batch=True) == 4
    fake.wait_for_applied(4, timeout=20)
    assert applied_seqs(fake) == [0, 1, 2, 3]
