"""Enqueue-time validation and normalisation of Customer.io operations.

:func:`normalize` is called on every ``.delay()``: it binds the caller's arguments to
the SDK method's signature, checks them against Customer.io's documented limits and
returns them in a canonical, JSON-safe form for the Celery message, so that a bad call
fails in the caller instead of in a worker minutes later.

Everything here is pure (no I/O) and cheap: signatures are precomputed tables, values
are walked once, and each payload is serialised to JSON at most once or twice.

Error messages name the operation, the field (a path such as ``data[<key 0>][2]``) and
the limit, never a value: ids, emails, attribute values and the keys of caller data are
customer data and these messages end up in logs. Only Customer.io's own field names
(:data:`SCHEMA_KEYS`) appear by name in paths; any other dict key is shown by its position.

Values are walked iteratively (never recursively) and at most :data:`MAX_NESTING_DEPTH`
containers deep, so the answer does not depend on the caller's stack, a value that contains
itself is refused, and nothing downstream (JSON encoding, the SDK) can hit the recursion limit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final, NamedTuple

from customerio import (
    SendEmailRequest,
    SendInAppRequest,
    SendInboxMessageRequest,
    SendPushRequest,
    SendSMSRequest,
    SendWhatsAppRequest,
)

from cio_celery.exceptions import ValidationError

__all__ = [
    "ATTRIBUTE_NAME_MAX_BYTES",
    "ATTRIBUTE_VALUE_MAX_BYTES",
    "BATCH_ACTIONS",
    "BATCH_BODY_MAX_BYTES",
    "BATCH_OPERATION_MAX_BYTES",
    "BATCH_OPERATION_TYPES",
    "DELIVERY_METRICS",
    "DEVICE_DATA_MAX_BYTES",
    "DEVICE_ID_MAX_BYTES",
    "DEVICE_PLATFORMS",
    "EMAIL_MAX_BYTES",
    "EVENT_DATA_MAX_BYTES",
    "EVENT_NAME_MAX_BYTES",
    "IDEMPOTENCY_KEY_MAX_BYTES",
    "IDENTIFIER_TYPES",
    "KEY_DISPLAY_MAX_CHARS",
    "MAX_ATTRIBUTES",
    "MAX_NESTING_DEPTH",
    "MERGE_ID_TYPES",
    "OPERATIONS",
    "PATH_ID_FIELDS",
    "PERSON_ID_MAX_BYTES",
    "RESERVED_NAMES",
    "SCHEMA_KEYS",
    "TIMESTAMP_LIMIT",
    "TRANSACTIONAL_DEFAULT_MAX_BYTES",
    "TRANSACTIONAL_MAX_BYTES",
    "json_size",
    "normalize",
    "validate_idempotency_key",
]

# --------------------------------------------------------------------------- limits

PERSON_ID_MAX_BYTES: Final = 150
"""identify ``id``, every ``customer_id``, merge ids of type ``id`` (UTF-8 bytes; ints by digits)."""
EMAIL_MAX_BYTES: Final = 150
"""An email used as an identifier (merge ids, batch and transactional identifiers)."""
DEVICE_ID_MAX_BYTES: Final = 1000
"""Device ids are push tokens, which are longer than person ids."""
DEVICE_PLATFORMS: Final[tuple[str, ...]] = ("ios", "android")
DEVICE_DATA_MAX_BYTES: Final = 100_000
"""``add_device`` ``**data`` as compact JSON."""
MAX_ATTRIBUTES: Final = 300
"""Attributes in one ``identify`` call."""
ATTRIBUTE_NAME_MAX_BYTES: Final = 150
ATTRIBUTE_VALUE_MAX_BYTES: Final = 1000
"""str values are measured as UTF-8 bytes, other values as their compact JSON."""
EVENT_NAME_MAX_BYTES: Final = 100
"""Event names (track, track_anonymous, backfill) and pageview ``page``."""
EVENT_DATA_MAX_BYTES: Final = 100_000
"""Event data (track/track_anonymous ``data``, pageview/backfill ``**data``) as compact JSON."""
MERGE_ID_TYPES: Final[tuple[str, ...]] = ("id", "email", "cio_id")
IDENTIFIER_TYPES: Final[tuple[str, ...]] = MERGE_ID_TYPES
"""Keys allowed in an ``identifiers`` dict (batch person operations, transactional sends)."""
BATCH_OPERATION_TYPES: Final[tuple[str, ...]] = ("person", "object", "delivery")
BATCH_ACTIONS: Final[dict[str, tuple[str, ...]]] = {
    "person": (
        "identify", "delete", "event", "screen", "page", "add_relationships", "delete_relationships",
        "add_device", "delete_device", "merge", "suppress", "unsuppress",
    ),
    "object": ("identify", "identify_anonymous", "delete", "add_relationships", "delete_relationships"),
    "delivery": ("event",),
}
"""The actions the Track API v2 documents for each operation type (its OpenAPI ``batch`` schema)."""
DELIVERY_METRICS: Final[tuple[str, ...]] = ("opened", "converted", "delivered")
"""``name`` of a delivery operation."""
BATCH_OPERATION_MAX_BYTES: Final = 32_000
BATCH_BODY_MAX_BYTES: Final = 500_000
"""The whole ``{"batch": [...]}`` request body."""
TRANSACTIONAL_MAX_BYTES: Final = 2_000_000
"""``send_email`` payload (attachments make it large)."""
TRANSACTIONAL_DEFAULT_MAX_BYTES: Final = 100_000
"""Every other transactional send payload."""
TIMESTAMP_LIMIT: Final = 10**10
"""Timestamps must be below this (year 2286): a bigger number is almost surely milliseconds."""
KEY_DISPLAY_MAX_CHARS: Final = 40
"""Argument names in error messages are cut to this many characters."""
MAX_NESTING_DEPTH: Final = 32
"""Most nested containers (dicts, lists) in one argument, the argument itself included.

Customer.io documents no nesting limit; 32 is far beyond any real attribute or event data
and far below every recursion limit on the way (JSON encoding, the SDK, Celery, kombu).
"""
IDEMPOTENCY_KEY_MAX_BYTES: Final = 150
"""``apply_async(..., idempotency_key=...)``: UTF-8 bytes, like a person id."""
PATH_ID_FIELDS: Final[dict[str, tuple[str, ...]]] = {
    "identify": ("id",),
    "track": ("customer_id",),
    "pageview": ("customer_id",),
    "backfill": ("customer_id",),
    "delete": ("customer_id",),
    "suppress": ("customer_id",),
    "unsuppress": ("customer_id",),
    "add_device": ("customer_id", "device_id"),
    "delete_device": ("customer_id", "device_id"),
}
"""The ids each operation puts in its URL path; none may be made only of dots.

``add_device`` sends its device id in the body, but it is the same kind of id as
``delete_device``'s, which is a path segment: one rule for both.
"""
SCHEMA_KEYS: Final[frozenset[str]] = frozenset({
    # v1/v2 Track API fields (batch operations, identifiers, devices, merges)
    "type", "action", "identifiers", "id", "email", "cio_id", "attributes", "name", "timestamp",
    "primary", "secondary", "device", "token", "platform", "last_used", "data", "object_type_id",
    "object_id", "cio_relationships", "relationships", "created_at", "unsubscribed", "anonymous_id",
    # App API transactional fields (the SDK's Send*Request field maps)
    "transactional_message_id", "disable_message_retention", "queue_draft", "message_data", "send_at",
    "language", "from", "to", "headers", "reply_to", "cc", "bcc", "subject", "preheader", "body",
    "body_plain", "body_amp", "fake_bcc", "send_to_unsubscribed", "tracked", "attachments",
    "disable_css_preprocessing", "title", "message", "image_url", "link", "custom_data",
    "custom_payload", "custom_device", "sound",
})
"""Customer.io's own field names: the only dict keys an error path shows by name."""
RESERVED_NAMES: Final[dict[str, str]] = {
    "self": "is reserved: the task functions take their own first parameter as self, so a worker "
    "could not call the task with it",
}
"""``**attrs`` / ``**data`` names that cannot travel as task keyword arguments."""

OPERATIONS: Final[tuple[str, ...]] = (
    "identify",
    "track",
    "track_anonymous",
    "pageview",
    "backfill",
    "delete",
    "suppress",
    "unsuppress",
    "add_device",
    "delete_device",
    "merge_customers",
    "batch",
    "send_email",
    "send_push",
    "send_sms",
    "send_whatsapp",
    "send_inbox_message",
    "send_in_app",
)

_EVENT_ACTIONS: Final = frozenset({"event", "page", "screen"})
_ULID_RE: Final = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
_INT_STR_RE: Final = re.compile(r"[+-]?[0-9]{1,30}")
_DOTS_PROBLEM: Final = "is made only of dots, which would change the request's URL path"
_ULID_PROBLEM: Final = "must be a ULID (26 Crockford base32 characters)"
_SURROGATE_PROBLEM: Final = "is not valid UTF-8 text (it holds a lone surrogate)"
_IDENTIFIERS_PROBLEM: Final = "must be a dict with exactly one of the keys id, email, cio_id"
_INF: Final = float("inf")
_UTC: Final = timezone.utc
# Ints below this many bits have at most ~903 decimal digits, so they cannot break a
# 1000-byte limit and never need measuring.
_SMALL_INT_BITS: Final = 3000

# ------------------------------------------------------------------------ json size

_PUBLIC_ENCODER: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _refuse(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _make_fast_encode() -> Callable[[Any], str]:
    """Compact JSON of an already cleaned value, as fast as the stdlib allows.

    ``JSONEncoder.encode`` builds a new C encoder on every call, which costs more than
    encoding a small payload; this builds it once. Values that went through _clean hold
    no cycles (the walk stops at MAX_NESTING_DEPTH), so no circular check.
    Falls back to the public encoder if the C accelerator is missing or differs.
    """
    fallback = json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return fallback.encode
    try:
        encoder = make(None, _refuse, basestring, None, ":", ",", False, False, False)
        probe = {"a": [1, 2.5, True, None, "é\n"], "b": {}}

        def encode(value: Any) -> str:
            return "".join(encoder(value, 0))

        if encode(probe) != fallback.encode(probe):
            return fallback.encode
    except Exception:  # noqa: BLE001 - any surprise in a private API means: use the public one
        return fallback.encode
    return encode


_fast_encode: Final = _make_fast_encode()


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact UTF-8 JSON (``separators=(",", ":")``, ``ensure_ascii=False``)."""
    text = _PUBLIC_ENCODER.encode(value)
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _size(operation: str, field: str, value: Any) -> int:
    """json_size of an already cleaned value, turning the rare failures into ValidationError."""
    try:
        try:
            text = _fast_encode(value)
        except RecursionError:
            # The C encoder recurses once per container (at most MAX_NESTING_DEPTH here), which
            # only fails for a caller already near the recursion limit: count without recursing.
            return _iterative_size(value)
    except ValueError:  # an int with more digits than int -> str conversion allows
        raise ValidationError(operation, field, "holds an integer too large to serialise") from None
    return len(text) if text.isascii() else len(text.encode("utf-8"))


_encode_str: Final[Callable[[str], str]] = getattr(json.encoder, "c_encode_basestring", None) or (
    json.encoder.py_encode_basestring
)


def _scalar_size(value: Any) -> int:
    if type(value) is str:
        text = _encode_str(value)
        return len(text) if text.isascii() else len(text.encode("utf-8"))
    if value is None or value is True:
        return 4
    if value is False:
        return 5
    if type(value) is float:
        return len(float.__repr__(value))
    return len(int.__repr__(value))  # ValueError past the int -> str digit limit, as the encoder


def _iterative_size(value: Any) -> int:
    """json_size of a cleaned value (str keys, finite floats) with an explicit stack."""
    total = 0
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            total += 2 + max(0, 2 * len(item) - 1)  # braces, a colon per pair, commas between
            for key, inner in item.items():
                total += _scalar_size(key)
                stack.append(inner)
        elif kind is list:
            total += 2 + max(0, len(item) - 1)
            stack.extend(item)
        else:
            total += _scalar_size(item)
    return total


# ------------------------------------------------------------------ field rendering


def _key_segment(key: Any, index: int) -> str:
    """Path segment for a dict key: ``.name`` for a Customer.io field name, else ``[<key i>]``.

    Keys of caller data are customer data as often as not (an email as a key, a person id
    as a key), and paths end up in logs: only the fixed vocabulary of Customer.io's own
    field names is shown; any other key is named by its position in its dict.
    """
    if type(key) is str and key in SCHEMA_KEYS:
        return "." + key
    return f"[<key {index}>]"


def _key_field(prefix: str, key: Any, index: int) -> str:
    return prefix + _key_segment(key, index)


def _type_name(value: Any) -> str:
    return type(value).__name__


# --------------------------------------------------------------------------- walking


class _Bad(Exception):
    """Raised in the value walk; ``segments`` is the path below the walked field, outermost first."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.segments: list[str] = []


def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(_SURROGATE_PROBLEM) from None


def _datetime_to_seconds(value: datetime) -> int:
    """Unix seconds, a naive datetime being UTC: exactly what the SDK sends."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=_UTC)
    return int(value.timestamp())


_NEST: Final = object()
"""Returned by :func:`_leaf` for a container: the walk goes into it."""
_NO_KEY: Final = object()
"""A dict frame's key while the key itself is being checked (the path stops at the dict)."""
_DEPTH_PROBLEM: Final = (
    f"is nested more than {MAX_NESTING_DEPTH} levels deep (or contains itself); "
    f"the limit is {MAX_NESTING_DEPTH} levels"
)


def _leaf(value: Any) -> Any:
    """A JSON-safe scalar for ``value``, or ``_NEST`` for a dict, list or tuple; raises _Bad."""
    kind = type(value)
    if kind is str:
        if not value.isascii():
            _check_utf8(value)
        return value
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if value != value:  # NaN: the SDK sends null
            return None
        if value == _INF or value == -_INF:
            raise _Bad("is infinite, which is not JSON-serialisable")
        return value
    if kind is dict or kind is list or kind is tuple:
        return _NEST
    if isinstance(value, datetime):
        return _datetime_to_seconds(value)
    if isinstance(value, str):
        return _leaf(str.__str__(value))  # a plain str now: one level, never deeper
    if isinstance(value, int):  # IntEnum and friends; bool is final and handled above
        return int.__int__(value)
    if isinstance(value, float):
        return _leaf(float.__float__(value))
    if isinstance(value, (dict, list, tuple)):
        return _NEST
    raise _Bad(f"is of type {_type_name(value)}, which is not JSON-serialisable")


def _clean_key(key: Any) -> str:
    if isinstance(key, str):
        text = str.__str__(key)  # a str subclass (StrEnum ...) as a plain str
        if not text.isascii():
            try:
                _check_utf8(text)
            except _Bad as bad:
                bad.problem = "has a key that is not valid UTF-8 text (it holds a lone surrogate)"
                raise
        return text
    raise _Bad(f"has a key of type {_type_name(key)}; JSON object keys must be strings")


def _frame(value: Any) -> list[Any]:
    """A walk frame: [items iterator, output container, is a dict, position, current key]."""
    if isinstance(value, dict):
        return [iter(value.items()), {}, True, 0, _NO_KEY]
    return [iter(value), [], False, 0, None]


def _segments(stack: list[list[Any]]) -> list[str]:
    out: list[str] = []
    for _, _, is_dict, position, key in stack:
        if not is_dict:
            out.append(f"[{position}]")
        elif key is not _NO_KEY:
            out.append(_key_segment(key, position))
    return out


def _clean(value: Any) -> Any:
    """A JSON-safe copy of ``value``; raises _Bad for what JSON cannot carry.

    The walk is iterative with an explicit stack of at most MAX_NESTING_DEPTH frames, so
    neither the answer nor the cost depends on the caller's own stack depth, and a value
    that contains itself ends at the depth limit.
    """
    leaf = _leaf(value)
    if leaf is not _NEST:
        return leaf
    root = _frame(value)
    stack = [root]
    try:
        while stack:
            frame = stack[-1]
            items, out, is_dict = frame[0], frame[1], frame[2]
            for item in items:
                if is_dict:
                    key, item = item
                    if type(key) is not str or not key.isascii():
                        frame[4] = _NO_KEY
                        key = _clean_key(key)
                    frame[4] = key
                kind = type(item)
                if (kind is str and item.isascii()) or kind is int or item is None or kind is bool:
                    leaf = item  # the common scalars, without a call
                else:
                    leaf = _leaf(item)
                if leaf is _NEST:
                    if len(stack) >= MAX_NESTING_DEPTH:
                        raise _Bad(_DEPTH_PROBLEM)
                    child = _frame(item)
                    if is_dict:
                        out[key] = child[1]
                    else:
                        out.append(child[1])
                    stack.append(child)
                    break  # walk the child; this frame's iterator resumes after it
                if is_dict:
                    out[key] = leaf
                else:
                    out.append(leaf)
                frame[3] += 1
            else:
                stack.pop()
                if stack:
                    stack[-1][3] += 1
    except _Bad as bad:
        segments = _segments(stack)
        # A too-deep value: its first step names the attribute or key; the rest is noise.
        bad.segments = segments[:1] if bad.problem is _DEPTH_PROBLEM else segments
        raise
    return root[1]


def _normalise(operation: str, field: str, value: Any) -> Any:
    """_clean with errors turned into ValidationError naming the full path."""
    try:
        return _clean(value)
    except _Bad as bad:
        raise ValidationError(operation, field + "".join(bad.segments), bad.problem) from None


def _normalise_items(operation: str, prefix: str, items: dict[str, Any]) -> dict[str, Any]:
    """_normalise for a ``**data`` catch-all whose keys are already plain str."""
    out: dict[str, Any] = {}
    for key, item in items.items():
        try:
            out[key] = _clean(item)
        except _Bad as bad:
            field = _key_field(prefix, key, len(out)) + "".join(bad.segments)
            raise ValidationError(operation, field, bad.problem) from None
    return out


# ------------------------------------------------------------------ scalar checkers


def _utf8_len(operation: str, field: str, text: str) -> int:
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValidationError(operation, field, _SURROGATE_PROBLEM) from None


def _int_digits(value: int) -> int:
    """Characters of str(value), without tripping the int -> str digit limit."""
    if value.bit_length() > _SMALL_INT_BITS:
        return 10**6  # over every limit here
    return len(str(value))


def _id(operation: str, field: str, value: Any, limit: int | None) -> str | int:
    """A non-blank str or int (not bool) of at most ``limit`` UTF-8 bytes / digits."""
    kind = type(value)
    if kind is str:
        text: str = value
        if not text or text.isspace():
            raise ValidationError(operation, field, "must not be blank")
        size = _utf8_len(operation, field, text)
        if limit is not None and size > limit:
            raise ValidationError(operation, field, f"is {size} bytes; the limit is {limit} bytes")
        return text
    if kind is int:
        number: int = value
        size = _int_digits(number)
        if limit is not None and size > limit:
            raise ValidationError(operation, field, f"is {size} digits long; the limit is {limit} bytes")
        return number
    if value is None:
        raise ValidationError(operation, field, "must not be None")
    if kind is not bool:
        if isinstance(value, str):
            return _id(operation, field, str.__str__(value), limit)
        if isinstance(value, int):
            return _id(operation, field, int.__int__(value), limit)
    raise ValidationError(operation, field, f"is of type {_type_name(value)}; must be a str or an int")


def _person_id(operation: str, field: str, value: Any) -> str | int:
    return _id(operation, field, value, PERSON_ID_MAX_BYTES)


def _path_id(operation: str, field: str, value: Any, limit: int) -> str | int:
    """An id that becomes a URL path segment: also never ``.``, ``..`` or only dots.

    The SDK percent-encodes ids (``/`` and ``%`` included) but leaves dots alone, and
    urllib3 removes dot segments before sending: ``..`` would climb to another endpoint.
    """
    checked = _id(operation, field, value, limit)
    if type(checked) is str and not checked.strip("."):
        raise ValidationError(operation, field, _DOTS_PROBLEM)
    return checked


def _path_person_id(operation: str, field: str, value: Any) -> str | int:
    return _path_id(operation, field, value, PERSON_ID_MAX_BYTES)


def _text(operation: str, field: str, value: Any, limit: int | None) -> str:
    """A non-blank str of at most ``limit`` UTF-8 bytes."""
    if type(value) is str:
        text: str = value
    elif value is None:
        raise ValidationError(operation, field, "must not be None")
    elif isinstance(value, str):
        text = str.__str__(value)
    else:
        raise ValidationError(operation, field, f"is of type {_type_name(value)}; must be a str")
    if not text or text.isspace():
        raise ValidationError(operation, field, "must not be blank")
    size = _utf8_len(operation, field, text)
    if limit is not None and size > limit:
        raise ValidationError(operation, field, f"is {size} bytes; the limit is {limit} bytes")
    return text


def _typed_id(operation: str, field: str, id_type: str, value: Any) -> str | int:
    """An identifier checked by its type: id, email or cio_id."""
    if id_type == "id":
        return _person_id(operation, field, value)
    if id_type == "email":
        return _text(operation, field, value, EMAIL_MAX_BYTES)
    return _text(operation, field, value, None)


def _event_name(operation: str, field: str, value: Any) -> str:
    return _text(operation, field, value, EVENT_NAME_MAX_BYTES)


def _ulid(operation: str, field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(operation, field, f"is of type {_type_name(value)}; {_ULID_PROBLEM}")
    upper = str.upper(value)
    if len(upper) != 26 or _ULID_RE.fullmatch(upper) is None:
        raise ValidationError(operation, field, _ULID_PROBLEM)
    return upper


def _timestamp(operation: str, field: str, value: Any) -> int:
    """Unix seconds from an int, a datetime, or a str/float holding a whole number."""
    kind = type(value)
    seconds: int
    if kind is int:
        seconds = value
    elif kind is bool:
        raise ValidationError(operation, field, "is of type bool; must be unix seconds (an int)")
    elif isinstance(value, datetime):
        seconds = _datetime_to_seconds(value)
        if seconds < 0:
            raise ValidationError(operation, field, "is before 1970; must be at or after the unix epoch")
        if seconds >= TIMESTAMP_LIMIT:
            raise ValidationError(operation, field, "is after the year 2286; the limit is 10**10 seconds")
        return seconds
    elif isinstance(value, float):
        if value != value or value in (_INF, -_INF):
            raise ValidationError(operation, field, "is not a finite number; must be unix seconds")
        # time.time() is the common caller: truncate like the SDK's datetime conversion.
        seconds = int(value)
    elif isinstance(value, str):
        stripped = value.strip()
        if _INT_STR_RE.fullmatch(stripped) is None:
            raise ValidationError(
                operation, field, "is a string that is not a whole number; must be unix seconds"
            )
        seconds = int(stripped)
    elif isinstance(value, int):
        seconds = int.__int__(value)
    elif value is None:
        raise ValidationError(operation, field, "must not be None")
    else:
        raise ValidationError(
            operation,
            field,
            f"is of type {_type_name(value)}; must be unix seconds (int), a datetime or a numeric string",
        )
    if seconds < 0:
        raise ValidationError(operation, field, "is negative; must be unix seconds (>= 0)")
    if seconds >= TIMESTAMP_LIMIT:
        raise ValidationError(
            operation, field, "is 10**10 or more, which looks like milliseconds; give seconds"
        )
    return seconds


def _check_size(operation: str, field: str, value: Any, limit: int) -> int:
    size = _size(operation, field, value)
    if size > limit:
        raise ValidationError(operation, field, f"is {size} bytes as JSON; the limit is {limit} bytes")
    return size


def _event_data(operation: str, field: str, value: Any) -> dict[str, Any] | None:
    """track/track_anonymous ``data``: None or a dict of at most EVENT_DATA_MAX_BYTES."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError(operation, field, f"is of type {_type_name(value)}; must be a dict or None")
    data: dict[str, Any] = _normalise(operation, field, value)
    _check_size(operation, field, data, EVENT_DATA_MAX_BYTES)
    return data


def _extra_data(operation: str, extras: dict[str, Any], limit: int) -> dict[str, Any]:
    """A ``**data`` catch-all, reported as ``data``."""
    if not extras:
        return {}
    data = _normalise_items(operation, "data", extras)
    _check_size(operation, "data", data, limit)
    return data


def _identifiers(operation: str, field: str, value: Any) -> dict[str, Any]:
    """``{"id"|"email"|"cio_id": value}`` with exactly one key (value already cleaned)."""
    if value is None:
        raise ValidationError(operation, field, "is required")
    if type(value) is not dict or len(value) != 1:
        raise ValidationError(operation, field, _IDENTIFIERS_PROBLEM)
    ((id_type, id_value),) = value.items()
    if id_type not in IDENTIFIER_TYPES:
        raise ValidationError(operation, field, _IDENTIFIERS_PROBLEM)
    return {id_type: _typed_id(operation, f"{field}.{id_type}", id_type, id_value)}


# ------------------------------------------------------------------ per operation

# Each checker gets the bound named-parameter values (a list it may rewrite in place)
# and the ``**`` catch-all (plain-str keys), and returns the catch-all to publish.
_Checker = Callable[[str, list[Any], dict[str, Any]], dict[str, Any]]


def _check_identify(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    values[0] = _path_person_id(op, "id", values[0])
    count = len(extras)
    if count > MAX_ATTRIBUTES:
        raise ValidationError(op, "attributes", f"has {count} attributes; the limit is {MAX_ATTRIBUTES}")
    attributes: dict[str, Any] = {}
    for name, raw in extras.items():
        name_size = len(name) if name.isascii() else _utf8_len(op, _attribute_field(name, attributes), name)
        if not name_size:
            raise ValidationError(op, _attribute_field(name, attributes), "name must not be empty")
        if name_size > ATTRIBUTE_NAME_MAX_BYTES:
            raise ValidationError(
                op,
                _attribute_field(name, attributes),
                f"name is {name_size} bytes; the limit is {ATTRIBUTE_NAME_MAX_BYTES} bytes",
            )
        kind = type(raw)
        if kind is str and raw.isascii():  # the common case, without the walk
            value: Any = raw
            size = len(raw)
        elif (kind is int and raw.bit_length() <= _SMALL_INT_BITS) or kind is bool or raw is None:
            value = raw
            size = 0
        else:
            try:
                value = _clean(raw)
            except _Bad as bad:
                field = _attribute_field(name, attributes) + "".join(bad.segments)
                raise ValidationError(op, field, bad.problem) from None
            kind = type(value)
            if kind is str:
                # At most 4 UTF-8 bytes a character: short text cannot break the limit.
                size = len(value)
                if size * 4 > ATTRIBUTE_VALUE_MAX_BYTES:
                    size = len(value.encode("utf-8"))
            elif kind is dict or kind is list or kind is int:
                size = _size(op, _attribute_field(name, attributes), value)
            else:  # None, bool, float: a few bytes
                size = 0
        if size > ATTRIBUTE_VALUE_MAX_BYTES:
            unit = "bytes" if kind is str else "bytes as JSON"
            raise ValidationError(
                op,
                _attribute_field(name, attributes),
                f"is {size} {unit}; the limit is {ATTRIBUTE_VALUE_MAX_BYTES} bytes",
            )
        attributes[name] = value
    return attributes


def _attribute_field(name: str, done: dict[str, Any]) -> str:
    """``attributes.<name>`` for the attribute being checked (the len(done)-th)."""
    return _key_field("attributes", name, len(done))


def _check_event(op: str, values: list[Any], extras: dict[str, Any], anonymous: bool) -> dict[str, Any]:
    if anonymous:
        anonymous_id = values[0]
        if anonymous_id is not None and not (type(anonymous_id) is str and anonymous_id == ""):
            values[0] = _person_id(op, "anonymous_id", anonymous_id)
    else:
        values[0] = _path_person_id(op, "customer_id", values[0])
    values[1] = _event_name(op, "name", values[1])
    values[2] = _event_data(op, "data", values[2])
    if values[3] is not None:
        values[3] = _ulid(op, "id", values[3])
    if values[4] is not None:
        values[4] = _timestamp(op, "timestamp", values[4])
    return extras


def _check_track(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    return _check_event(op, values, extras, anonymous=False)


def _check_track_anonymous(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    return _check_event(op, values, extras, anonymous=True)


def _check_pageview(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    values[0] = _path_person_id(op, "customer_id", values[0])
    values[1] = _event_name(op, "page", values[1])
    return _extra_data(op, extras, EVENT_DATA_MAX_BYTES)


def _check_backfill(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    values[0] = _path_person_id(op, "customer_id", values[0])
    values[1] = _event_name(op, "name", values[1])
    values[2] = _timestamp(op, "timestamp", values[2])
    return _extra_data(op, extras, EVENT_DATA_MAX_BYTES)


def _check_customer(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    values[0] = _path_person_id(op, "customer_id", values[0])
    return extras


def _check_device_id(op: str, values: list[Any]) -> None:
    values[0] = _path_person_id(op, "customer_id", values[0])
    values[1] = _path_id(op, "device_id", values[1], DEVICE_ID_MAX_BYTES)


def _check_add_device(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    _check_device_id(op, values)
    platform = values[2]
    if type(platform) is not str or platform not in DEVICE_PLATFORMS:
        raise ValidationError(op, "platform", "must be 'ios' or 'android'")
    if "id" in extras:
        # The SDK overwrites data["id"] with device_id: refuse rather than drop silently.
        raise ValidationError(op, "data.id", "would be overwritten by device_id; leave it out")
    return _extra_data(op, extras, DEVICE_DATA_MAX_BYTES)


def _check_delete_device(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    _check_device_id(op, values)
    return extras


_MERGE_FIELDS: Final = ((0, "primary_id_type", "primary_id"), (2, "secondary_id_type", "secondary_id"))


def _check_merge(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    for type_index, type_field, id_field in _MERGE_FIELDS:
        id_type = values[type_index]
        if type(id_type) is not str or id_type not in MERGE_ID_TYPES:
            raise ValidationError(op, type_field, "must be one of 'id', 'email', 'cio_id'")
        values[type_index + 1] = _typed_id(op, id_field, id_type, values[type_index + 1])
    return extras


def _check_batch(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    raw = values[0]
    if not isinstance(raw, (list, tuple)):
        raise ValidationError(
            op, "operations", f"is of type {_type_name(raw)}; must be a non-empty list of operation dicts"
        )
    if not raw:
        raise ValidationError(op, "operations", "must not be empty")
    operations: list[Any] = _normalise(op, "operations", raw)
    total = 0
    for index, operation in enumerate(operations):
        field = f"operations[{index}]"
        if type(operation) is not dict:
            raise ValidationError(op, field, f"is of type {_type_name(operation)}; must be a dict")
        kind = operation.get("type")
        if type(kind) is not str or kind not in BATCH_OPERATION_TYPES:
            raise ValidationError(op, field + ".type", "must be one of 'person', 'object', 'delivery'")
        action = operation.get("action")
        actions = BATCH_ACTIONS[kind]
        if type(action) is not str or action not in actions:
            raise ValidationError(op, field + ".action", f"must be one of {_quoted(actions)} (the {kind} actions)")
        if operation.get("timestamp") is not None:
            operation["timestamp"] = _timestamp(op, field + ".timestamp", operation["timestamp"])
        attributes = operation.get("attributes", {})
        if type(attributes) is not dict:
            raise ValidationError(op, field + ".attributes", f"is of type {_type_name(attributes)}; must be a dict")
        _BATCH_ITEM_CHECKS[kind](op, field, action, operation)
        total += _check_size(op, field, operation, BATCH_OPERATION_MAX_BYTES)
    # {"batch":[op,op,...]}: 12 bytes of framing plus a comma between operations.
    body = total + len(operations) - 1 + len('{"batch":[]}')
    if body > BATCH_BODY_MAX_BYTES:
        raise ValidationError(
            op, "operations", f"make a {body}-byte request body; the limit is {BATCH_BODY_MAX_BYTES} bytes"
        )
    values[0] = operations
    return extras


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(repr(name) for name in names)


def _batch_person(op: str, field: str, action: str, operation: dict[str, Any]) -> None:
    if action == "merge":
        if "identifiers" in operation:
            raise ValidationError(op, field + ".identifiers", "must be absent: a merge names primary and secondary")
        for side in ("primary", "secondary"):
            operation[side] = _identifiers(op, f"{field}.{side}", operation.get(side))
        return
    operation["identifiers"] = _identifiers(op, field + ".identifiers", operation.get("identifiers"))
    if action in _EVENT_ACTIONS:
        if "name" not in operation:
            raise ValidationError(op, field + ".name", f"is required for a person {action} operation")
        operation["name"] = _event_name(op, field + ".name", operation["name"])
        if operation.get("id") is not None:
            operation["id"] = _ulid(op, field + ".id", operation["id"])
    elif action in ("add_device", "delete_device"):
        device = operation.get("device")
        if type(device) is not dict:
            raise ValidationError(op, field + ".device", f"is required for a person {action} operation (a dict)")
        device["token"] = _text(op, field + ".device.token", device.get("token"), None)
        platform = device.get("platform")
        if (platform is not None or action == "add_device") and platform not in DEVICE_PLATFORMS:
            raise ValidationError(op, field + ".device.platform", "must be 'ios' or 'android'")
    elif action in ("add_relationships", "delete_relationships"):
        _relationships(op, field, action, operation)


def _batch_object(op: str, field: str, action: str, operation: dict[str, Any]) -> None:
    ids = operation.get("identifiers")
    where = field + ".identifiers"
    if type(ids) is not dict or set(ids) not in ({"object_type_id", "object_id"}, {"cio_object_id"}):
        raise ValidationError(op, where, "must be {'object_type_id': ..., 'object_id': ...} or {'cio_object_id': ...}")
    for key in ids:
        ids[key] = _text(op, f"{where}.{key}", ids[key], None)
    if action in ("add_relationships", "delete_relationships"):
        _relationships(op, field, action, operation)


def _batch_delivery(op: str, field: str, action: str, operation: dict[str, Any]) -> None:
    ids = operation.get("identifiers")
    if type(ids) is not dict or set(ids) != {"id"}:
        raise ValidationError(op, field + ".identifiers", "must be {'id': <delivery id>}")
    ids["id"] = _text(op, field + ".identifiers.id", ids["id"], None)
    if operation.get("name") not in DELIVERY_METRICS:
        raise ValidationError(op, field + ".name", f"must be one of {_quoted(DELIVERY_METRICS)}")
    attributes = operation.get("attributes")
    if type(attributes) is not dict:
        raise ValidationError(op, field + ".attributes", "is required for a delivery (a dict with device_token)")
    attributes["device_token"] = _text(op, field + ".attributes.device_token", attributes.get("device_token"), None)


def _relationships(op: str, field: str, action: str, operation: dict[str, Any]) -> None:
    relationships = operation.get("cio_relationships")
    if type(relationships) is not list or not relationships:
        raise ValidationError(op, field + ".cio_relationships", f"is required for {action} (a non-empty list)")


_BATCH_ITEM_CHECKS: Final[dict[str, Callable[[str, str, str, dict[str, Any]], None]]] = {
    "person": _batch_person,
    "object": _batch_object,
    "delivery": _batch_delivery,
}


_REQUEST_CLASSES: Final[dict[str, type[Any]]] = {
    "send_email": SendEmailRequest,
    "send_push": SendPushRequest,
    "send_sms": SendSMSRequest,
    "send_whatsapp": SendWhatsAppRequest,
    "send_inbox_message": SendInboxMessageRequest,
    "send_in_app": SendInAppRequest,
}
_ANY_REQUEST_CLASS: Final = tuple(_REQUEST_CLASSES.values())


def _check_send(op: str, values: list[Any], extras: dict[str, Any]) -> dict[str, Any]:
    request = values[0]
    expected = _REQUEST_CLASSES[op]
    if isinstance(request, expected):
        request = request._to_dict()
    elif isinstance(request, _ANY_REQUEST_CLASS):
        raise ValidationError(
            op, "request", f"is a {_type_name(request)}; {op} takes a dict or a {expected.__name__}"
        )
    elif not isinstance(request, dict):
        raise ValidationError(
            op, "request", f"is of type {_type_name(request)}; {op} takes a dict or a {expected.__name__}"
        )
    payload: dict[str, Any] = _normalise(op, "request", request)
    message_id = payload.get("transactional_message_id")
    if message_id is None:
        raise ValidationError(op, "request.transactional_message_id", "is required")
    payload["transactional_message_id"] = _id(op, "request.transactional_message_id", message_id, None)
    payload["identifiers"] = _identifiers(op, "request.identifiers", payload.get("identifiers"))
    limit = TRANSACTIONAL_MAX_BYTES if op == "send_email" else TRANSACTIONAL_DEFAULT_MAX_BYTES
    _check_size(op, "request", payload, limit)
    values[0] = payload
    return extras


# ----------------------------------------------------------------------- signatures


class _Spec(NamedTuple):
    params: tuple[str, ...]  # named parameters in signature order
    required: int  # the first ``required`` of them have no default (every default is None)
    varkw: str | None  # name of the ** catch-all, if any
    positions: dict[str, int]  # parameter name -> position
    padding: tuple[tuple[None, ...], ...]  # padding[n]: the defaults after n positional args
    check: _Checker


def _spec(params: tuple[str, ...], required: int, varkw: str | None, check: _Checker) -> _Spec:
    positions = {name: i for i, name in enumerate(params)}
    padding = tuple((None,) * (len(params) - given) for given in range(len(params) + 1))
    return _Spec(params, required, varkw, positions, padding, check)


_EVENT_PARAMS: Final = ("name", "data", "id", "timestamp")
_SPECS: Final[dict[str, _Spec]] = {
    "identify": _spec(("id",), 1, "attrs", _check_identify),
    "track": _spec(("customer_id", *_EVENT_PARAMS), 2, None, _check_track),
    "track_anonymous": _spec(("anonymous_id", *_EVENT_PARAMS), 2, None, _check_track_anonymous),
    "pageview": _spec(("customer_id", "page"), 2, "data", _check_pageview),
    "backfill": _spec(("customer_id", "name", "timestamp"), 3, "data", _check_backfill),
    "delete": _spec(("customer_id",), 1, None, _check_customer),
    "suppress": _spec(("customer_id",), 1, None, _check_customer),
    "unsuppress": _spec(("customer_id",), 1, None, _check_customer),
    "add_device": _spec(("customer_id", "device_id", "platform"), 3, "data", _check_add_device),
    "delete_device": _spec(("customer_id", "device_id"), 2, None, _check_delete_device),
    "merge_customers": _spec(
        ("primary_id_type", "primary_id", "secondary_id_type", "secondary_id"), 4, None, _check_merge
    ),
    "batch": _spec(("operations",), 1, None, _check_batch),
    **{name: _spec(("request",), 1, None, _check_send) for name in _REQUEST_CLASSES},
}
assert tuple(_SPECS) == OPERATIONS


def _argument_name(key: Any, index: int) -> str:
    """An unknown keyword's name when it looks like one (a Python identifier), else its position."""
    if type(key) is str and key.isidentifier() and key.isascii():
        return key if len(key) <= KEY_DISPLAY_MAX_CHARS else key[:KEY_DISPLAY_MAX_CHARS] + "..."
    return f"<argument #{index}>"


def _bind(
    operation: str, spec: _Spec, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Python's own binding rules, from the precomputed table (no inspect per call)."""
    params = spec.params
    given = len(args)
    values = list(args)
    if given < len(params):
        values += spec.padding[given]  # every default is None
    elif given > len(params):
        raise ValidationError(
            operation, "args", f"has {given} positional arguments; {operation} takes at most {len(params)}"
        )
    extras: dict[str, Any] = {}
    if kwargs:
        positions = spec.positions
        for key, value in kwargs.items():
            index = positions.get(key)
            if index is None:
                if spec.varkw is None:
                    position = list(kwargs).index(key)
                    raise ValidationError(
                        operation, _argument_name(key, position), f"is not an argument of {operation}"
                    )
                if type(key) is not str:
                    if not isinstance(key, str):
                        raise ValidationError(
                            operation,
                            f"<argument #{list(kwargs).index(key)}>",
                            f"is named by a {_type_name(key)}; argument names must be str",
                        )
                    key = str.__str__(key)
                if key in RESERVED_NAMES:
                    label = "attributes" if spec.varkw == "attrs" else "data"
                    raise ValidationError(operation, f"{label}.{key}", RESERVED_NAMES[key])
                extras[key] = value
            elif index < given:
                raise ValidationError(operation, params[index], "was given both positionally and by keyword")
            else:
                values[index] = value
    for index in range(given, spec.required):
        if params[index] not in kwargs:
            raise ValidationError(operation, params[index], "is required")
    return values, extras


def normalize(
    operation: str, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Validate one Customer.io call and return its canonical ``(args, kwargs)``.

    ``args`` holds every named parameter of the SDK method in signature order (defaults
    filled in) and ``kwargs`` only the ``**attrs``/``**data`` catch-all, all JSON-safe:
    datetimes become unix seconds (naive = UTC), NaN becomes None, tuples become lists,
    ``Send*Request`` objects become dicts, timestamps become int seconds and ULIDs upper
    case. ``normalize`` of its own output returns it unchanged.

    Raises :class:`~cio_celery.exceptions.ValidationError` naming the field and the limit
    (never the value), or ValueError for an unknown operation.
    """
    spec = _SPECS.get(operation)
    if spec is None:
        shown = operation[:KEY_DISPLAY_MAX_CHARS] if isinstance(operation, str) else _type_name(operation)
        raise ValueError(f"unknown Customer.io operation {shown!r}; expected one of {', '.join(OPERATIONS)}")
    values, extras = _bind(operation, spec, args, kwargs)
    extras = spec.check(operation, values, extras)
    return tuple(values), extras


def validate_idempotency_key(operation: str, key: Any) -> str:
    """A caller's ``idempotency_key``: a non-blank str of at most 150 UTF-8 bytes, as a plain str.

    Raises :class:`~cio_celery.exceptions.ValidationError` (field ``idempotency_key``)
    naming the limit, never the key.
    """
    field = "idempotency_key"
    if not isinstance(key, str):
        raise ValidationError(operation, field, f"is of type {_type_name(key)}; must be a non-blank string")
    text = str.__str__(key)
    if not text or text.isspace():
        raise ValidationError(operation, field, "must be a non-blank string")
    size = _utf8_len(operation, field, text)
    if size > IDEMPOTENCY_KEY_MAX_BYTES:
        raise ValidationError(operation, field, f"is {size} bytes; the limit is {IDEMPOTENCY_KEY_MAX_BYTES} bytes")
    return text
