"""What each operation is: which API it uses and how the worker performs it."""

from __future__ import annotations

from typing import Any

from .client import Clients
from .meta import META_KEY
from .validation import OPERATIONS

__all__ = [
    "APP_OPERATIONS", "BATCHABLE", "EVENT_OPERATIONS", "META_KEY", "OPERATIONS", "TRACK_OPERATIONS", "api_of",
    "perform",
]

# The operation list has one home (validation's signature table); the App API ones are the sends.
APP_OPERATIONS = tuple(op for op in OPERATIONS if op.startswith("send_"))
TRACK_OPERATIONS = tuple(op for op in OPERATIONS if op not in APP_OPERATIONS)


# Track-API operations that have a /api/v2/batch form (batching.py converts them): they may be
# drained in batches after an outage and coalesced into batches under load. Transactional sends
# have their own rate bucket and no batch form; `batch` is a batch already; `backfill` is kept
# on v1 (its timestamp rules differ).
BATCHABLE = frozenset({"identify", "track", "track_anonymous", "pageview", "delete", "add_device",
                       "delete_device", "merge_customers", "suppress", "unsuppress"})

# Operations that carry an event id (a ULID): Customer.io drops a repeated one.
EVENT_OPERATIONS = frozenset({"track", "track_anonymous", "pageview", "backfill"})
# Index of the `id` parameter in the normalised positional args, where the SDK has one.
EVENT_ID_ARG = {"track": 3, "track_anonymous": 3}


def api_of(operation: str) -> str:
    """``"track"`` or ``"app"``: which credentials and rate limit an operation uses."""
    return "app" if operation in APP_OPERATIONS else "track"


def perform(
    clients: Clients, operation: str, args: list[Any], kwargs: dict[str, Any], event_id: str | None
) -> dict[str, Any]:
    """Send one operation; returns non-personal facts about the answer."""
    if operation in APP_OPERATIONS:
        body = getattr(clients.app, operation)(args[0])
        return {"delivery_id": body.get("delivery_id")} if isinstance(body, dict) else {}
    track = clients.track
    if operation == "pageview":
        track.pageview_with_id(args[0], args[1], event_id, kwargs)
    elif operation == "backfill":
        track.backfill_with_id(args[0], args[1], args[2], event_id, kwargs)
    else:
        getattr(track, operation)(*args, **kwargs)
    return {}
