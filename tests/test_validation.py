"""cio_celery.validation: every rule with its exact message, normalisation, idempotence."""

from __future__ import annotations

import enum
import inspect
import json
import math
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from customerio import (
    APIClient,
    CustomerIO,
    SendEmailRequest,
    SendInAppRequest,
    SendInboxMessageRequest,
    SendPushRequest,
    SendSMSRequest,
    SendWhatsAppRequest,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cio_celery import validation as v
from cio_celery.exceptions import ValidationError
from cio_celery.validation import BATCH_ACTIONS, OPERATIONS, json_size, normalize

SECRET = "secret-person@example.com"
ULID = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
TS = 1_700_000_000


def fails(op: str, args: Any, kwargs: dict[str, Any], field: str, problem: str) -> ValidationError:
    """Assert normalize() raises exactly ``f"{op}: {field} {problem}"`` and return the error."""
    with pytest.raises(ValidationError, match="^" + re.escape(f"{op}: {field} {problem}") + "$") as info:
        normalize(op, tuple(args), kwargs)
    assert info.value.operation == op
    assert info.value.field == field
    assert info.value.problem == problem
    return info.value


def sdk_method(op: str) -> Any:
    return getattr(APIClient if op.startswith("send_") else CustomerIO, op)


# ------------------------------------------------------------------------ the API


def test_operations_are_the_18_sdk_methods_in_order() -> None:
    assert OPERATIONS == (
        "identify", "track", "track_anonymous", "pageview", "backfill", "delete", "suppress",
        "unsuppress", "add_device", "delete_device", "merge_customers", "batch", "send_email",
        "send_push", "send_sms", "send_whatsapp", "send_inbox_message", "send_in_app",
    )  # fmt: skip


def test_limits_are_exported() -> None:
    assert v.PERSON_ID_MAX_BYTES == 150
    assert v.EMAIL_MAX_BYTES == 150
    assert v.DEVICE_ID_MAX_BYTES == 1000
    assert set(v.DEVICE_PLATFORMS) == {"ios", "android"}
    assert v.DEVICE_DATA_MAX_BYTES == 100_000
    assert v.MAX_ATTRIBUTES == 300
    assert v.ATTRIBUTE_NAME_MAX_BYTES == 150
    assert v.ATTRIBUTE_VALUE_MAX_BYTES == 1000
    assert v.EVENT_NAME_MAX_BYTES == 100
    assert v.EVENT_DATA_MAX_BYTES == 100_000
    assert set(v.MERGE_ID_TYPES) == {"id", "email", "cio_id"}
    assert v.BATCH_OPERATION_MAX_BYTES == 32_000
    assert v.BATCH_BODY_MAX_BYTES == 500_000
    assert v.TRANSACTIONAL_MAX_BYTES == 2_000_000
    assert v.TRANSACTIONAL_DEFAULT_MAX_BYTES == 100_000
    assert v.TIMESTAMP_LIMIT == 10**10


@pytest.mark.parametrize("op", OPERATIONS)
def test_precomputed_signature_matches_the_sdk(op: str) -> None:
    spec = v._SPECS[op]
    params = list(inspect.signature(sdk_method(op)).parameters.values())[1:]  # drop self
    named = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    varkw = [p.name for p in params if p.kind is p.VAR_KEYWORD]
    assert spec.params == tuple(p.name for p in named)
    assert spec.required == sum(p.default is p.empty for p in named)
    assert all(p.default in (p.empty, None) for p in named)
    assert (spec.varkw is not None) == bool(varkw)


def test_unknown_operation_is_a_plain_value_error() -> None:
    with pytest.raises(ValueError, match=r"unknown Customer\.io operation 'nope'") as info:
        normalize("nope", (), {})
    assert type(info.value) is ValueError


def test_json_size_is_compact_utf8() -> None:
    assert json_size({"a": [1, 2], "b": None}) == len('{"a":[1,2],"b":null}')
    assert json_size("é") == 4  # two quotes + two UTF-8 bytes
    assert json_size({"k": "€"}) == len('{"k":""}') + 3


# ----------------------------------------------------------------------- binding


def test_missing_argument() -> None:
    fails("track", ["user-1"], {}, "name", "is required")
    fails("backfill", ["user-1", "ev"], {}, "timestamp", "is required")
    fails("merge_customers", ["id", "a", "email"], {}, "secondary_id", "is required")


def test_unexpected_keyword() -> None:
    fails("track", ["user-1", "ev"], {"properties": {}}, "properties", "is not an argument of track")
    fails("delete", ["user-1"], {"x" * 60: 1}, "x" * 40 + "...", "is not an argument of delete")


def test_argument_given_twice() -> None:
    fails("track", ["user-1", "ev"], {"name": "ev"}, "name", "was given both positionally and by keyword")


def test_too_many_positional_arguments() -> None:
    fails("delete", ["a", "b"], {}, "args", "has 2 positional arguments; delete takes at most 1")


def test_catch_all_names_must_be_str() -> None:
    bad_kwargs: dict[Any, Any] = {3: "x"}
    fails(
        "identify", ["user-1"], bad_kwargs, "<argument #0>", "is named by a int; argument names must be str"
    )


def test_keywords_bind_like_python() -> None:
    assert normalize("track", (), {"customer_id": "u", "name": "ev", "timestamp": TS}) == (
        ("u", "ev", None, None, TS),
        {},
    )
    # identify's id may come by keyword; everything else is an attribute
    assert normalize("identify", (), {"id": "u", "plan": "pro"}) == (("u",), {"plan": "pro"})


# ------------------------------------------------------------------- person ids

PERSON_CALLS: list[tuple[str, list[Any], str]] = [
    ("identify", [], "id"),
    ("track", ["ev"], "customer_id"),
    ("pageview", ["/home"], "customer_id"),
    ("backfill", ["ev", TS], "customer_id"),
    ("delete", [], "customer_id"),
    ("suppress", [], "customer_id"),
    ("unsuppress", [], "customer_id"),
    ("add_device", ["tok", "ios"], "customer_id"),
    ("delete_device", ["tok"], "customer_id"),
]


@pytest.mark.parametrize(("op", "rest", "field"), PERSON_CALLS)
def test_person_id_rules(op: str, rest: list[Any], field: str) -> None:
    fails(op, [None, *rest], {}, field, "must not be None")
    fails(op, ["", *rest], {}, field, "must not be blank")
    fails(op, [" \t\n", *rest], {}, field, "must not be blank")
    fails(op, [True, *rest], {}, field, "is of type bool; must be a str or an int")
    fails(op, [1.5, *rest], {}, field, "is of type float; must be a str or an int")
    fails(op, ["a" * 151, *rest], {}, field, "is 151 bytes; the limit is 150 bytes")
    fails(op, ["é" * 76, *rest], {}, field, "is 152 bytes; the limit is 150 bytes")  # bytes, not chars
    fails(op, [10**150, *rest], {}, field, "is 151 digits long; the limit is 150 bytes")
    assert normalize(op, ("a" * 150, *rest), {})[0][0] == "a" * 150
    assert normalize(op, ("é" * 75, *rest), {})[0][0] == "é" * 75
    out = normalize(op, (42, *rest), {})[0][0]
    assert out == 42 and type(out) is int  # int ids stay ints


def test_person_id_subclasses_become_plain() -> None:
    class Tier(enum.IntEnum):
        GOLD = 7

    class Name(str, enum.Enum):
        ALICE = "alice"

    out_int = normalize("delete", (Tier.GOLD,), {})[0][0]
    out_str = normalize("delete", (Name.ALICE,), {})[0][0]
    assert (type(out_int), out_int) == (int, 7)
    assert (type(out_str), out_str) == (str, "alice")


def test_anonymous_id_may_be_absent() -> None:
    assert normalize("track_anonymous", (None, "ev"), {})[0][0] is None
    assert normalize("track_anonymous", ("", "ev"), {})[0][0] == ""
    assert normalize("track_anonymous", (123, "ev"), {})[0][0] == 123
    assert normalize("track_anonymous", ("anon-1", "ev"), {})[0][0] == "anon-1"


def test_anonymous_id_rules_when_given() -> None:
    op = "track_anonymous"
    fails(op, ["a" * 151, "ev"], {}, "anonymous_id", "is 151 bytes; the limit is 150 bytes")
    fails(op, [[1], "ev"], {}, "anonymous_id", "is of type list; must be a str or an int")
    fails(op, [False, "ev"], {}, "anonymous_id", "is of type bool; must be a str or an int")
    fails(op, ["   ", "ev"], {}, "anonymous_id", "must not be blank")


# ----------------------------------------------------------------------- devices


def test_device_id_rules() -> None:
    for op, rest in (("add_device", ["ios"]), ("delete_device", [])):
        fails(op, ["u", "", *rest], {}, "device_id", "must not be blank")
        fails(op, ["u", None, *rest], {}, "device_id", "must not be None")
        fails(op, ["u", b"tok", *rest], {}, "device_id", "is of type bytes; must be a str or an int")
        fails(op, ["u", "t" * 1001, *rest], {}, "device_id", "is 1001 bytes; the limit is 1000 bytes")
        assert normalize(op, ("u", "t" * 1000, *rest), {})[0][1] == "t" * 1000  # longer than 150


def test_platform_rules() -> None:
    for bad in ("web", "iOS", "", None, 1):
        fails("add_device", ["u", "tok", bad], {}, "platform", "must be 'ios' or 'android'")
    assert normalize("add_device", ("u", "tok", "android"), {})[0][2] == "android"


def test_device_data_size() -> None:
    ok = {"x": "a" * (100_000 - len('{"x":""}'))}
    assert normalize("add_device", ("u", "tok", "ios"), ok)[1] == ok
    too_big = {"x": "a" * (100_001 - len('{"x":""}'))}
    fails(
        "add_device",
        ["u", "tok", "ios"],
        too_big,
        "data",
        "is 100001 bytes as JSON; the limit is 100000 bytes",
    )


def test_device_data_may_not_carry_id() -> None:
    fails(
        "add_device",
        ["u", "tok", "ios"],
        {"id": "x"},
        "data.id",
        "would be overwritten by device_id; leave it out",
    )


# -------------------------------------------------------------------- attributes


def test_attribute_count() -> None:
    ok = {f"a{i}": i for i in range(300)}
    assert normalize("identify", ("u",), ok)[1] == ok
    fails(
        "identify",
        ["u"],
        {f"a{i}": i for i in range(301)},
        "attributes",
        "has 301 attributes; the limit is 300",
    )


def test_attribute_name_rules() -> None:
    fails("identify", ["u"], {"": 1}, "attributes[<key 0>]", "name must not be empty")
    long_name = "n" * 151
    fails(
        "identify",
        ["u"],
        {"a": 1, long_name: 1},
        "attributes[<key 1>]",
        "name is 151 bytes; the limit is 150 bytes",
    )
    fails(
        "identify",
        ["u"],
        {"ñ" * 76: 1},
        "attributes[<key 0>]",
        "name is 152 bytes; the limit is 150 bytes",
    )
    assert normalize("identify", ("u",), {"n" * 150: 1})[1] == {"n" * 150: 1}


def test_attribute_value_size() -> None:
    fails("identify", ["u"], {"bio": "b" * 1001}, "attributes[<key 0>]", "is 1001 bytes; the limit is 1000 bytes")
    fails("identify", ["u"], {"email": "é" * 501}, "attributes.email", "is 1002 bytes; the limit is 1000 bytes")
    fails(
        "identify",
        ["u"],
        {"tags": ["t" * 500, "t" * 500]},
        "attributes[<key 0>]",
        "is 1007 bytes as JSON; the limit is 1000 bytes",
    )
    assert normalize("identify", ("u",), {"bio": "b" * 1000, "x": "é" * 500})[1]["bio"] == "b" * 1000
    # non-str values are measured as their JSON: 996 chars, 2 quotes, 2 brackets
    assert normalize("identify", ("u",), {"l": ["x" * 996]})[1] == {"l": ["x" * 996]}


def test_attribute_names_in_paths_are_positions_unless_customerio_field_names() -> None:
    fails(
        "identify",
        ["u"],
        {"ok": 1, "bad\nname": {1}},
        "attributes[<key 1>]",
        "is of type set, which is not JSON-serialisable",
    )
    fails(
        "identify",
        ["u"],
        {"p" * 45: {"x": {2}}},
        "attributes[<key 0>][<key 0>]",
        "is of type set, which is not JSON-serialisable",
    )
    fails(
        "identify",
        ["u"],
        {"ada.lovelace@example.com": 1, "created_at": {"title": [0, {1}]}},
        "attributes.created_at.title[1]",
        "is of type set, which is not JSON-serialisable",
    )


# ------------------------------------------------------------------ event names

EVENT_NAME_CALLS: list[tuple[str, list[Any], int, str]] = [
    ("track", ["u", None], 1, "name"),
    ("track_anonymous", ["anon", None], 1, "name"),
    ("backfill", ["u", None, TS], 1, "name"),
    ("pageview", ["u", None], 1, "page"),
]


@pytest.mark.parametrize(("op", "args", "pos", "field"), EVENT_NAME_CALLS)
def test_event_name_rules(op: str, args: list[Any], pos: int, field: str) -> None:
    def with_name(name: Any) -> list[Any]:
        return [*args[:pos], name, *args[pos + 1 :]]

    fails(op, with_name(""), {}, field, "must not be blank")
    fails(op, with_name("  "), {}, field, "must not be blank")
    fails(op, with_name(None), {}, field, "must not be None")
    fails(op, with_name(5), {}, field, "is of type int; must be a str")
    fails(op, with_name("e" * 101), {}, field, "is 101 bytes; the limit is 100 bytes")
    fails(op, with_name("é" * 51), {}, field, "is 102 bytes; the limit is 100 bytes")
    assert normalize(op, tuple(with_name("e" * 100)), {})[0][pos] == "e" * 100


# ------------------------------------------------------------------- event data


def test_track_data_must_be_a_dict_or_none() -> None:
    fails("track", ["u", "ev", ["x"]], {}, "data", "is of type list; must be a dict or None")
    fails("track_anonymous", [None, "ev", "x"], {}, "data", "is of type str; must be a dict or None")
    assert normalize("track", ("u", "ev", None), {})[0][2] is None
    assert normalize("track", ("u", "ev", {}), {})[0][2] == {}


def test_event_data_size() -> None:
    room = 100_000 - len('{"x":""}')
    assert normalize("track", ("u", "ev", {"x": "a" * room}), {})[0][2] == {"x": "a" * room}
    problem = "is 100001 bytes as JSON; the limit is 100000 bytes"
    fails("track", ["u", "ev", {"x": "a" * (room + 1)}], {}, "data", problem)
    fails("track_anonymous", ["", "ev", {"x": "a" * (room + 1)}], {}, "data", problem)
    fails("pageview", ["u", "/p"], {"x": "a" * (room + 1)}, "data", problem)
    fails("backfill", ["u", "ev", TS], {"x": "a" * (room + 1)}, "data", problem)
    # multi-byte text counts in UTF-8 bytes
    fails(
        "track",
        ["u", "ev", {"x": "é" * 50_000}],
        {},
        "data",
        "is 100008 bytes as JSON; the limit is 100000 bytes",
    )


# --------------------------------------------------------------------- event id


def test_event_id_ulid() -> None:
    problem = "must be a ULID (26 Crockford base32 characters)"
    for bad in (
        "",
        ULID[:25],
        ULID + "0",
        "8" + ULID[1:],
        "I" + ULID[1:],
        ULID[:25] + "L",
        ULID[:25] + "O",
        ULID[:25] + "U",
        ULID[:25] + "-",
    ):
        fails("track", ["u", "ev", None, bad], {}, "id", problem)
        fails("track_anonymous", [None, "ev"], {"id": bad}, "id", problem)
    fails("track", ["u", "ev"], {"id": 12}, "id", "is of type int; " + problem)
    assert normalize("track", ("u", "ev"), {"id": ULID.lower()})[0][3] == ULID  # upper-cased
    assert (
        normalize("track", ("u", "ev"), {"id": "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"})[0][3]
        == "7ZZZZZZZZZZZZZZZZZZZZZZZZZ"
    )


# ------------------------------------------------------------------- timestamps


@pytest.mark.parametrize(
    ("op", "args"), [("track", ["u", "ev"]), ("track_anonymous", [None, "ev"]), ("backfill", ["u", "ev"])]
)
def test_timestamp_rules(op: str, args: list[Any]) -> None:
    def norm(ts: Any) -> Any:
        return normalize(op, tuple(args), {"timestamp": ts})[0][4 if op != "backfill" else 2]

    def bad(ts: Any, problem: str) -> None:
        fails(op, args, {"timestamp": ts}, "timestamp", problem)

    assert norm(TS) == TS
    assert norm(0) == 0
    assert norm(str(TS)) == TS and type(norm(str(TS))) is int
    assert norm(f" {TS} ") == TS
    assert norm(float(TS)) == TS and type(norm(float(TS))) is int
    assert norm(datetime(2023, 11, 14, 22, 13, 20)) == TS  # naive means UTC
    assert norm(datetime(2023, 11, 15, 0, 13, 20, tzinfo=timezone(timedelta(hours=2)))) == TS
    assert norm(10**10 - 1) == 10**10 - 1
    bad(TS * 1000, "is 10**10 or more, which looks like milliseconds; give seconds")
    bad(str(TS * 1000), "is 10**10 or more, which looks like milliseconds; give seconds")
    bad(10**10, "is 10**10 or more, which looks like milliseconds; give seconds")
    bad(-1, "is negative; must be unix seconds (>= 0)")
    bad("yesterday", "is a string that is not a whole number; must be unix seconds")
    bad("1700000000.5", "is a string that is not a whole number; must be unix seconds")
    assert norm(TS + 0.7) == TS, "time.time() works: fractions are truncated"
    bad(math.nan, "is not a finite number; must be unix seconds")
    bad(math.inf, "is not a finite number; must be unix seconds")
    bad(True, "is of type bool; must be unix seconds (an int)")
    bad([TS], "is of type list; must be unix seconds (int), a datetime or a numeric string")
    bad(datetime(1969, 12, 31), "is before 1970; must be at or after the unix epoch")
    bad(datetime(2300, 1, 1), "is after the year 2286; the limit is 10**10 seconds")


def test_optional_timestamp_may_be_none_but_backfill_needs_one() -> None:
    assert normalize("track", ("u", "ev"), {"timestamp": None})[0][4] is None
    fails("backfill", ["u", "ev", None], {}, "timestamp", "must not be None")


# ---------------------------------------------------------------------- merging


def test_merge_id_types() -> None:
    for bad in ("ID", "phone", "", None, 1):
        fails(
            "merge_customers",
            [bad, "a", "id", "b"],
            {},
            "primary_id_type",
            "must be one of 'id', 'email', 'cio_id'",
        )
        fails(
            "merge_customers",
            ["id", "a", bad, "b"],
            {},
            "secondary_id_type",
            "must be one of 'id', 'email', 'cio_id'",
        )


def test_merge_ids_checked_by_type() -> None:
    op = "merge_customers"
    fails(op, ["id", "a" * 151, "id", "b"], {}, "primary_id", "is 151 bytes; the limit is 150 bytes")
    fails(op, ["id", "a", "id", None], {}, "secondary_id", "must not be None")
    fails(op, ["email", " ", "id", "b"], {}, "primary_id", "must not be blank")
    fails(op, ["email", 12, "id", "b"], {}, "primary_id", "is of type int; must be a str")
    fails(
        op,
        ["id", "a", "email", "e" * 140 + "@example.com"],
        {},
        "secondary_id",
        "is 152 bytes; the limit is 150 bytes",
    )
    fails(op, ["cio_id", "", "id", "b"], {}, "primary_id", "must not be blank")
    fails(op, ["cio_id", 5, "id", "b"], {}, "primary_id", "is of type int; must be a str")
    assert normalize(op, ("id", 7, "cio_id", "c" * 300), {}) == (("id", 7, "cio_id", "c" * 300), {})


# ------------------------------------------------------------------------ batch


def person_event(**extra: Any) -> dict[str, Any]:
    return {"type": "person", "action": "event", "identifiers": {"id": "u"}, "name": "ev", **extra}


def test_batch_operations_container() -> None:
    fails(
        "batch", [None], {}, "operations", "is of type NoneType; must be a non-empty list of operation dicts"
    )
    fails(
        "batch",
        [{"type": "person"}],
        {},
        "operations",
        "is of type dict; must be a non-empty list of operation dicts",
    )
    fails("batch", [[]], {}, "operations", "must not be empty")
    fails("batch", [()], {}, "operations", "must not be empty")
    fails("batch", [[person_event(), "op"]], {}, "operations[1]", "is of type str; must be a dict")


def test_batch_type_and_action() -> None:
    fails(
        "batch",
        [[{"action": "identify"}]],
        {},
        "operations[0].type",
        "must be one of 'person', 'object', 'delivery'",
    )
    fails(
        "batch",
        [[{"type": "people", "action": "identify"}]],
        {},
        "operations[0].type",
        "must be one of 'person', 'object', 'delivery'",
    )
    object_actions = "'identify', 'identify_anonymous', 'delete', 'add_relationships', 'delete_relationships'"
    fails("batch", [[{"type": "object"}]], {}, "operations[0].action",
          f"must be one of {object_actions} (the object actions)")
    fails("batch", [[{"type": "object", "action": "page"}]], {}, "operations[0].action",
          f"must be one of {object_actions} (the object actions)")
    fails("batch", [[{"type": "delivery", "action": " "}]], {}, "operations[0].action",
          "must be one of 'event' (the delivery actions)")
    person_actions = ", ".join(repr(a) for a in BATCH_ACTIONS["person"])
    fails("batch", [[{"type": "person", "action": "track", "identifiers": {"id": "u"}}]], {},
          "operations[0].action", f"must be one of {person_actions} (the person actions)")


OBJECT = {"type": "object", "action": "identify", "identifiers": {"object_type_id": "1", "object_id": "acme"}}


def test_batch_object_and_delivery_shapes() -> None:
    ok = [OBJECT, {"type": "object", "action": "delete", "identifiers": {"cio_object_id": "o1"}},
          {"type": "delivery", "action": "event", "identifiers": {"id": "d1"}, "name": "opened",
           "attributes": {"device_token": "t"}}]
    assert normalize("batch", (ok,), {})[0][0] == ok
    shape = "must be {'object_type_id': ..., 'object_id': ...} or {'cio_object_id': ...}"
    fails("batch", [[{**OBJECT, "identifiers": {"id": "u"}}]], {}, "operations[0].identifiers", shape)
    fails("batch", [[{**OBJECT, "identifiers": {"object_type_id": "1"}}]], {}, "operations[0].identifiers", shape)
    fails("batch", [[{**OBJECT, "identifiers": {"cio_object_id": " "}}]], {},
          "operations[0].identifiers.cio_object_id", "must not be blank")
    fails("batch", [[{**OBJECT, "action": "add_relationships"}]], {}, "operations[0].cio_relationships",
          "is required for add_relationships (a non-empty list)")
    fails("batch", [[{**OBJECT, "attributes": ["x"]}]], {}, "operations[0].attributes",
          "is of type list; must be a dict")
    delivery = ok[2]
    fails("batch", [[{**delivery, "name": "clicked"}]], {}, "operations[0].name",
          "must be one of 'opened', 'converted', 'delivered'")
    fails("batch", [[{**delivery, "identifiers": {"email": "a@b"}}]], {}, "operations[0].identifiers",
          "must be {'id': <delivery id>}")
    fails("batch", [[{**delivery, "attributes": {}}]], {}, "operations[0].attributes.device_token",
          "must not be None")
    device = {"type": "person", "action": "add_device", "identifiers": {"id": "u"}, "device": {"token": "t"}}
    fails("batch", [[device]], {}, "operations[0].device.platform", "must be 'ios' or 'android'")
    assert normalize("batch", ([{**device, "action": "delete_device"}],), {})[0][0][0]["device"] == {"token": "t"}
    merge = {"type": "person", "action": "merge", "primary": {"id": "a"}, "secondary": {"id": "b"}}
    fails("batch", [[{**merge, "identifiers": {"id": "a"}}]], {}, "operations[0].identifiers",
          "must be absent: a merge names primary and secondary")


def test_batch_person_identifiers() -> None:
    problem = "must be a dict with exactly one of the keys id, email, cio_id"
    base = {"type": "person", "action": "identify"}
    fails("batch", [[base]], {}, "operations[0].identifiers", "is required")
    fails("batch", [[{**base, "identifiers": {}}]], {}, "operations[0].identifiers", problem)
    fails(
        "batch",
        [[{**base, "identifiers": {"id": "a", "email": "b"}}]],
        {},
        "operations[0].identifiers",
        problem,
    )
    fails("batch", [[{**base, "identifiers": {"phone": "a"}}]], {}, "operations[0].identifiers", problem)
    fails("batch", [[{**base, "identifiers": "u"}]], {}, "operations[0].identifiers", problem)
    fails(
        "batch",
        [[{**base, "identifiers": {"id": "a" * 151}}]],
        {},
        "operations[0].identifiers.id",
        "is 151 bytes; the limit is 150 bytes",
    )
    fails(
        "batch",
        [[{**base, "identifiers": {"email": ""}}]],
        {},
        "operations[0].identifiers.email",
        "must not be blank",
    )
    fails(
        "batch",
        [[{**base, "identifiers": {"cio_id": None}}]],
        {},
        "operations[0].identifiers.cio_id",
        "must not be None",
    )


def test_batch_person_merge_uses_primary_and_secondary() -> None:
    merge = {"type": "person", "action": "merge", "primary": {"id": "a"}, "secondary": {"email": "b@x.io"}}
    assert normalize("batch", ([merge],), {})[0][0] == [merge]
    fails("batch", [[{**merge, "secondary": None}]], {}, "operations[0].secondary", "is required")


def test_batch_event_name_and_id() -> None:
    for action in ("event", "page", "screen"):
        op = {"type": "person", "action": action, "identifiers": {"id": "u"}}
        fails("batch", [[op]], {}, "operations[0].name", f"is required for a person {action} operation")
        fails("batch", [[{**op, "name": ""}]], {}, "operations[0].name", "must not be blank")
        fails(
            "batch",
            [[{**op, "name": "n" * 101}]],
            {},
            "operations[0].name",
            "is 101 bytes; the limit is 100 bytes",
        )
        fails(
            "batch", [[{**op, "name": "n", "id": "nope"}]], {}, "operations[0].id",
            "must be a ULID (26 Crockford base32 characters)",
        )  # fmt: skip
    out = normalize("batch", ([person_event(id=ULID.lower())],), {})[0][0]
    assert out[0]["id"] == ULID
    # non-event actions need no name
    assert normalize("batch", ([{"type": "person", "action": "identify", "identifiers": {"id": 1}}],), {})


def test_batch_timestamps_normalised() -> None:
    out = normalize("batch", ([person_event(timestamp=datetime(2023, 11, 14, 22, 13, 20))],), {})[0][0]
    assert out[0]["timestamp"] == TS
    fails(
        "batch",
        [[person_event(timestamp=TS * 1000)]],
        {},
        "operations[0].timestamp",
        "is 10**10 or more, which looks like milliseconds; give seconds",
    )


def test_batch_operation_size() -> None:
    op = {**OBJECT, "attributes": {"x": ""}}
    room = 32_000 - json_size(op)
    ok = {**op, "attributes": {"x": "a" * room}}
    assert normalize("batch", ([ok],), {})[0][0] == [ok]
    big = {**op, "attributes": {"x": "a" * (room + 1)}}
    fails(
        "batch",
        [[person_event(), big]],
        {},
        "operations[1]",
        "is 32001 bytes as JSON; the limit is 32000 bytes",
    )


def test_batch_body_size() -> None:
    op = {**OBJECT, "attributes": {"x": "a" * 31_000}}
    ops = [op] * 16
    body = json_size({"batch": ops})
    assert body < 500_000
    assert normalize("batch", (ops,), {})[0][0] == ops
    ops = [op] * 17
    body = json_size({"batch": ops})
    fails("batch", [ops], {}, "operations", f"make a {body}-byte request body; the limit is 500000 bytes")


def test_batch_accepts_tuples_and_returns_lists() -> None:
    (ops,), _ = normalize("batch", ((person_event(),),), {})
    assert ops == [person_event()] and type(ops) is list


# ----------------------------------------------------------------- transactional

SENDS: list[tuple[str, type[Any]]] = [
    ("send_email", SendEmailRequest),
    ("send_push", SendPushRequest),
    ("send_sms", SendSMSRequest),
    ("send_whatsapp", SendWhatsAppRequest),
    ("send_inbox_message", SendInboxMessageRequest),
    ("send_in_app", SendInAppRequest),
]


@pytest.mark.parametrize(("op", "cls"), SENDS)
def test_send_request_object_becomes_its_dict(op: str, cls: type[Any]) -> None:
    request = cls(transactional_message_id="welcome", identifiers={"id": "u"}, message_data={"n": 1})
    (payload,), kwargs = normalize(op, (request,), {})
    assert (
        payload
        == request._to_dict()
        == {
            "transactional_message_id": "welcome",
            "identifiers": {"id": "u"},
            "message_data": {"n": 1},
        }
    )
    assert kwargs == {}


@pytest.mark.parametrize(("op", "cls"), SENDS)
def test_send_wrong_request_class(op: str, cls: type[Any]) -> None:
    other = SendSMSRequest if cls is not SendSMSRequest else SendPushRequest
    request = other(transactional_message_id=1, identifiers={"id": "u"})
    fails(op, [request], {}, "request", f"is a {other.__name__}; {op} takes a dict or a {cls.__name__}")
    fails(op, [None], {}, "request", f"is of type NoneType; {op} takes a dict or a {cls.__name__}")
    fails(op, ["{}"], {}, "request", f"is of type str; {op} takes a dict or a {cls.__name__}")


@pytest.mark.parametrize("op", [op for op, _ in SENDS])
def test_send_message_id_and_identifiers(op: str) -> None:
    problem = "must be a dict with exactly one of the keys id, email, cio_id"
    good = {"transactional_message_id": 3, "identifiers": {"email": "a@b.io"}}
    fails(op, [{"identifiers": {"id": "u"}}], {}, "request.transactional_message_id", "is required")
    fails(
        op,
        [{**good, "transactional_message_id": " "}],
        {},
        "request.transactional_message_id",
        "must not be blank",
    )
    fails(
        op,
        [{**good, "transactional_message_id": True}],
        {},
        "request.transactional_message_id",
        "is of type bool; must be a str or an int",
    )
    fails(op, [{"transactional_message_id": 3}], {}, "request.identifiers", "is required")
    fails(op, [{**good, "identifiers": {"id": "u", "email": "a@b.io"}}], {}, "request.identifiers", problem)
    fails(op, [{**good, "identifiers": {"phone": "1"}}], {}, "request.identifiers", problem)
    fails(op, [{**good, "identifiers": ["u"]}], {}, "request.identifiers", problem)
    fails(op, [{**good, "identifiers": {"id": ""}}], {}, "request.identifiers.id", "must not be blank")
    fails(
        op, [{**good, "identifiers": {"cio_id": " "}}], {}, "request.identifiers.cio_id", "must not be blank"
    )
    # unknown keys are allowed: the API grows
    assert normalize(op, ({**good, "brand_new_option": [1]},), {})[0][0] == {**good, "brand_new_option": [1]}


@pytest.mark.parametrize(
    ("op", "limit"), [(op, 2_000_000 if op == "send_email" else 100_000) for op, _ in SENDS]
)
def test_send_payload_size(op: str, limit: int) -> None:
    base = {"transactional_message_id": 1, "identifiers": {"id": "u"}, "message_data": {"x": ""}}
    room = limit - json_size(base)
    ok = {**base, "message_data": {"x": "a" * room}}
    assert normalize(op, (ok,), {})[0][0] == ok
    big = {**base, "message_data": {"x": "a" * (room + 1)}}
    fails(op, [big], {}, "request", f"is {limit + 1} bytes as JSON; the limit is {limit} bytes")


def test_send_email_attachments_may_be_large() -> None:
    request = SendEmailRequest(transactional_message_id=1, identifiers={"id": "u"})
    request.attach("report.pdf", b"%PDF" * 300_000)  # 1.6 MB of base64
    (payload,), _ = normalize("send_email", (request,), {})
    assert payload["attachments"]["report.pdf"].startswith("JVBER")
    push = {"transactional_message_id": 1, "identifiers": {"id": "u"}, "custom_data": {"a": "b" * 200_000}}
    with pytest.raises(ValidationError):
        normalize("send_push", (push,), {})


# ------------------------------------------------------------ JSON serialisability


def test_unserialisable_types_name_the_path_and_type() -> None:
    fails(
        "track",
        ["u", "ev", {"items": [1, 2, {3}]}],
        {},
        "data[<key 0>][2]",
        "is of type set, which is not JSON-serialisable",
    )
    fails(
        "identify",
        ["u"],
        {"plan": object()},
        "attributes[<key 0>]",
        "is of type object, which is not JSON-serialisable",
    )
    fails(
        "send_sms",
        [{"transactional_message_id": 1, "identifiers": {"id": "u"}, "message_data": {"x": b"1"}}],
        {},
        "request.message_data[<key 0>]",
        "is of type bytes, which is not JSON-serialisable",
    )
    fails(
        "pageview",
        ["u", "/p"],
        {"when": datetime(2024, 1, 1).date()},
        "data[<key 0>]",
        "is of type date, which is not JSON-serialisable",
    )
    fails(
        "batch",
        [[{**person_event(), "attributes": {"a": [[complex(1, 2)]]}}]],
        {},
        "operations[0].attributes[<key 0>][0][0]",
        "is of type complex, which is not JSON-serialisable",
    )


def test_dict_keys_must_be_str() -> None:
    fails(
        "track",
        ["u", "ev", {"m": {1: "x"}}],
        {},
        "data[<key 0>]",
        "has a key of type int; JSON object keys must be strings",
    )


def test_infinity_refused() -> None:
    fails(
        "track",
        ["u", "ev", {"score": [math.inf]}],
        {},
        "data[<key 0>][0]",
        "is infinite, which is not JSON-serialisable",
    )
    fails(
        "identify",
        ["u"],
        {"score": -math.inf},
        "attributes[<key 0>]",
        "is infinite, which is not JSON-serialisable",
    )


def test_keys_of_caller_data_never_appear_in_paths() -> None:
    email = "ada.lovelace@example.com"
    error = fails(
        "track",
        ["u", "ev", {"a": 1, "b": 2, "c": 3, email: math.inf}],
        {},
        "data[<key 3>]",
        "is infinite, which is not JSON-serialisable",
    )
    assert "ada" not in str(error)
    fails(
        "track",
        ["u", "ev", {"a": 1, "b\x00": {1}}],
        {},
        "data[<key 1>]",
        "is of type set, which is not JSON-serialisable",
    )
    fails(
        "send_email",
        [{"transactional_message_id": 1, "identifiers": {"id": "u"},
          "attachments": {"invoice-of-ada.pdf": b"%PDF"}}],
        {},
        "request.attachments[<key 0>]",
        "is of type bytes, which is not JSON-serialisable",
    )
    fails(
        "pageview",
        ["u", "/p"],
        {"ok": 1, "user-7@example.com": {1}},
        "data[<key 1>]",
        "is of type set, which is not JSON-serialisable",
    )


DEPTH = v.MAX_NESTING_DEPTH
DEPTH_PROBLEM = f"is nested more than {DEPTH} levels deep (or contains itself); the limit is {DEPTH} levels"


def nested(levels: int, leaf: Any = 1) -> Any:
    """``levels`` nested containers around ``leaf``, alternating lists and dicts, a list innermost."""
    value = leaf
    for level in range(levels):
        value = {"k": value} if level % 2 else [value]
    return value


@pytest.mark.parametrize("op", ["track", "identify", "pageview", "batch", "send_push"])
def test_nesting_limit_is_exact_for_every_container_argument(op: str) -> None:
    def call(levels: int) -> tuple[list[Any], dict[str, Any], str]:
        if op == "track":  # data is level 1
            return ["u", "ev", {"x": nested(levels - 1)}], {}, "data[<key 0>]"
        if op == "identify":  # an attribute value is level 1
            return ["u"], {"x": nested(levels)}, "attributes[<key 0>][0]"
        if op == "pageview":
            return ["u", "/p"], {"x": nested(levels)}, "data[<key 0>][0]"
        if op == "batch":  # the list is level 1, the operation 2, its attributes 3
            event = {**person_event(), "attributes": {"x": nested(levels - 3)}}
            return [[event]], {}, "operations[0]"
        request = {"transactional_message_id": 1, "identifiers": {"id": "u"}, "custom_data": nested(levels - 1)}
        return [request], {}, "request.custom_data"

    args, kwargs, _ = call(DEPTH)
    normalize(op, tuple(args), kwargs)
    args, kwargs, field = call(DEPTH + 1)
    fails(op, args, kwargs, field, DEPTH_PROBLEM)


def test_cycles_end_at_the_nesting_limit() -> None:
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    fails("track", ["u", "ev", cyclic], {}, "data[<key 0>]", DEPTH_PROBLEM)
    looped: list[Any] = []
    looped.append(looped)
    fails("identify", ["u"], {"loop": looped}, "attributes[<key 0>][0]", DEPTH_PROBLEM)


def stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1  # type: ignore[assignment]
    return depth


def at_stack_depth(free_frames: int, fn: Any) -> Any:
    """Run ``fn`` with only ``free_frames`` frames left below the recursion limit."""
    def down(n: int) -> Any:
        return down(n - 1) if n > 0 else fn()

    return down(sys.getrecursionlimit() - stack_depth() - free_frames)


@pytest.mark.parametrize("free_frames", [25, 60, 500])
def test_the_nesting_answer_does_not_depend_on_the_callers_stack(free_frames: int) -> None:
    deep = nested(100_001)

    def refused() -> ValidationError:
        with pytest.raises(ValidationError) as info:
            normalize("identify", ("u",), {"deep": deep})
        return info.value

    error = at_stack_depth(free_frames, refused)
    assert (error.field, error.problem) == ("attributes[<key 0>][0]", DEPTH_PROBLEM)
    # the deepest allowed value is allowed, and measured right, at any caller depth too
    allowed = {"ok": nested(DEPTH, "é\n\"x"), "n": [1.5, None, True, False, -7]}
    assert at_stack_depth(free_frames, lambda: normalize("identify", ("u",), allowed))[1] == allowed
    big = {"x": nested(DEPTH - 1, "y" * 990)}
    assert at_stack_depth(free_frames, lambda: v._size("track", "data", big)) == json_size(big)


@settings(max_examples=100, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
def test_iterative_size_agrees_with_the_encoder(value: Any) -> None:
    assert v._iterative_size(value) == json_size(value)


def test_lone_surrogates_refused() -> None:
    problem = "is not valid UTF-8 text (it holds a lone surrogate)"
    fails("track", ["u", "ev", {"x": ["ok", "bad\ud800"]}], {}, "data[<key 0>][1]", problem)
    fails("delete", ["bad\udfff"], {}, "customer_id", problem)
    fails(
        "track",
        ["u", "ev", {"k\ud800": 1}],
        {},
        "data",
        "has a key that is not valid UTF-8 text (it holds a lone surrogate)",
    )


def test_huge_integers_refused_without_crashing() -> None:
    fails("identify", ["u"], {"n": 10**5000}, "attributes[<key 0>]", "holds an integer too large to serialise")


# --------------------------------------------------------------- normalisation


def test_datetimes_become_unix_seconds_like_the_sdk() -> None:
    data = {
        "naive": datetime(2023, 11, 14, 22, 13, 20),
        "aware": datetime(2023, 11, 14, 23, 13, 20, tzinfo=timezone(timedelta(hours=1))),
        "nested": [{"at": datetime(1960, 1, 1, 0, 0, 0, 500_000)}],
    }
    (_, _, out, _, _), _ = normalize("track", ("u", "ev", data), {})
    assert out == {"naive": TS, "aware": TS, "nested": [{"at": -315619199}]}
    sdk = CustomerIO(site_id="s", api_key="k")
    assert out == sdk._sanitize(data)


def test_nan_becomes_none_like_the_sdk() -> None:
    (_, _, out, _, _), _ = normalize("track", ("u", "ev", {"a": math.nan, "b": [1.5, math.nan]}), {})
    assert out == {"a": None, "b": [1.5, None]}
    assert normalize("identify", ("u",), {"score": math.nan})[1] == {"score": None}


def test_tuples_become_lists() -> None:
    _, kwargs = normalize("pageview", ("u", "/p"), {"path": ("a", ("b", "c"))})
    assert kwargs == {"path": ["a", ["b", "c"]]}
    assert type(kwargs["path"]) is list and type(kwargs["path"][1]) is list


def test_enum_and_subclass_values_become_plain_json_types() -> None:
    class Plan(str, enum.Enum):
        PRO = "pro"

    class Level(enum.IntEnum):
        HIGH = 3

    class Data(dict):  # type: ignore[type-arg]
        pass

    _, kwargs = normalize("identify", ("u",), {"plan": Plan.PRO, "level": Level.HIGH, "d": Data(a=1)})
    assert kwargs == {"plan": "pro", "level": 3, "d": {"a": 1}}
    assert [type(x) for x in kwargs.values()] == [str, int, dict]
    assert json.dumps(kwargs) == '{"plan": "pro", "level": 3, "d": {"a": 1}}'


def test_send_request_datetimes_normalised() -> None:
    request = SendPushRequest(
        transactional_message_id=1, identifiers={"id": "u"}, send_at=datetime(2023, 11, 14, 22, 13, 20)
    )
    (payload,), _ = normalize("send_push", (request,), {})
    assert payload["send_at"] == TS


def test_output_is_a_copy() -> None:
    data = {"tags": ["a"]}
    (_, _, out, _, _), _ = normalize("track", ("u", "ev", data), {})
    out["tags"].append("b")
    assert data == {"tags": ["a"]}


# ------------------------------------------------------------ happy path per op

HAPPY: list[tuple[str, tuple[Any, ...], dict[str, Any], tuple[Any, ...], dict[str, Any]]] = [
    ("identify", ("u1",), {"email": "a@b.io", "created_at": datetime(2023, 11, 14, 22, 13, 20)},
     ("u1",), {"email": "a@b.io", "created_at": TS}),
    ("track", ("u1", "signed_up"), {"data": {"plan": "pro"}, "id": ULID.lower(), "timestamp": str(TS)},
     ("u1", "signed_up", {"plan": "pro"}, ULID, TS), {}),
    ("track_anonymous", ("anon", "viewed", {"n": (1, 2)}), {},
     ("anon", "viewed", {"n": [1, 2]}, None, None), {}),
    ("pageview", (7, "https://example.com/pricing"), {"referrer": "x"},
     (7, "https://example.com/pricing"), {"referrer": "x"}),
    ("backfill", ("u1", "bought", datetime(2023, 11, 14, 22, 13, 20)), {"price": 9.5},
     ("u1", "bought", TS), {"price": 9.5}),
    ("delete", ("u1",), {}, ("u1",), {}),
    ("suppress", (), {"customer_id": "u1"}, ("u1",), {}),
    ("unsuppress", (5,), {}, (5,), {}),
    ("add_device", ("u1", "tok" * 60, "ios"), {"last_used": datetime(2023, 11, 14, 22, 13, 20)},
     ("u1", "tok" * 60, "ios"), {"last_used": TS}),
    ("delete_device", ("u1", "tok"), {}, ("u1", "tok"), {}),
    ("merge_customers", ("id", "u1", "email", "a@b.io"), {}, ("id", "u1", "email", "a@b.io"), {}),
    ("batch", ((person_event(),),), {}, ([person_event()],), {}),
    ("send_email",
     (SendEmailRequest(transactional_message_id="w", identifiers={"email": "a@b.io"}, _from="x@y.io"),), {},
     ({"transactional_message_id": "w", "identifiers": {"email": "a@b.io"}, "from": "x@y.io"},), {}),
    ("send_push", ({"transactional_message_id": 2, "identifiers": {"id": 1}},), {},
     ({"transactional_message_id": 2, "identifiers": {"id": 1}},), {}),
    ("send_sms", (SendSMSRequest(transactional_message_id=3, identifiers={"cio_id": "c1"}),), {},
     ({"transactional_message_id": 3, "identifiers": {"cio_id": "c1"}},), {}),
    ("send_whatsapp", (), {"request": {"transactional_message_id": 4, "identifiers": {"id": "u"}}},
     ({"transactional_message_id": 4, "identifiers": {"id": "u"}},), {}),
    ("send_inbox_message",
     (SendInboxMessageRequest(transactional_message_id=5, identifiers={"id": "u"}),), {},
     ({"transactional_message_id": 5, "identifiers": {"id": "u"}},), {}),
    ("send_in_app", (SendInAppRequest(transactional_message_id=6, identifiers={"id": "u"}),), {},
     ({"transactional_message_id": 6, "identifiers": {"id": "u"}},), {}),
]  # fmt: skip


def test_happy_path_covers_every_operation() -> None:
    assert [case[0] for case in HAPPY] == list(OPERATIONS)


@pytest.mark.parametrize(
    ("op", "args", "kwargs", "want_args", "want_kwargs"), HAPPY, ids=[c[0] for c in HAPPY]
)
def test_happy_path(
    op: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    want_args: tuple[Any, ...],
    want_kwargs: dict[str, Any],
) -> None:
    out = normalize(op, args, kwargs)
    assert out == (want_args, want_kwargs)
    assert normalize(op, *out) == out
    assert json.loads(json.dumps([list(out[0]), out[1]], allow_nan=False)) == [list(out[0]), out[1]]
    # the worker can call the SDK method with exactly this
    inspect.signature(sdk_method(op)).bind(object(), *out[0], **out[1])


# -------------------------------------------------------------- values never leak


def leaky_calls() -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    s = SECRET
    return [
        ("identify", (s * 10,), {}),
        ("identify", ("u",), {"bio": s * 50}),
        ("identify", ("u",), {"bio": {s}}),
        ("identify", ("u",), {"bio": [s, math.inf]}),
        ("track", (s.encode(),), {"name": "ev"}),
        ("track", (s, s * 5), {}),
        ("track", (s, "ev"), {"id": s}),
        ("track", (s, "ev"), {"timestamp": s}),
        ("track", (s, "ev", s), {}),
        ("track", (s, "ev", {"x": s * 5000}), {}),
        ("track", (s, "ev", {"x": s + "\ud800"}), {}),
        ("track", (s, "ev"), {"bogus": s}),
        ("track", (s, "ev", None, None, None, s), {}),
        ("track_anonymous", (s * 7, "ev"), {}),
        ("backfill", (s, "ev", s), {}),
        ("backfill", (s, "ev", str(TS * 1000)), {}),
        ("add_device", (s, s * 50, "ios"), {}),
        ("add_device", (s, s, s), {}),
        ("merge_customers", ("email", s * 7, "id", s), {}),
        ("merge_customers", (s, s, "id", s), {}),
        ("batch", ([{"type": s, "action": s}],), {}),
        ("batch", ([{"type": "person", "action": "event", "identifiers": {"email": s * 7}}],), {}),
        ("batch", ([{"type": "person", "action": "event", "identifiers": {"email": s, "id": s}}],), {}),
        (
            "batch",
            ([{"type": "person", "action": "event", "identifiers": {"email": s}, "name": s, "id": s}],),
            {},
        ),
        ("batch", ([{"type": "object", "action": "identify", "attributes": {"x": s * 1300}}],), {}),
        ("send_email", ({"transactional_message_id": s, "identifiers": {"email": s, "id": s}},), {}),
        ("send_email", ({"transactional_message_id": s, "identifiers": {"email": s * 7}},), {}),
        (
            "send_sms",
            ({"transactional_message_id": s, "identifiers": {"email": s}, "message_data": {s}},),
            {},
        ),
        ("send_push", (SendSMSRequest(transactional_message_id=s, identifiers={"email": s}),), {}),
    ]


@pytest.mark.parametrize(("op", "args", "kwargs"), leaky_calls())
def test_messages_never_contain_values(op: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        normalize(op, args, kwargs)
    for text in (str(info.value), repr(info.value), info.value.field, info.value.problem):
        assert "secret" not in text and "example.com" not in text


# ---------------------------------------------------------------- hypothesis

json_keys = st.text(max_size=8)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64)
    | st.floats(allow_infinity=False)  # NaN included: it becomes None
    | st.text(max_size=12)
    | st.datetimes(
        min_value=datetime(1900, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.none() | st.just(timezone.utc) | st.just(timezone(timedelta(hours=-5))),
    )
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(json_keys, inner, max_size=3)
    ),
    max_leaves=8,
)
data_dicts = st.dictionaries(json_keys, json_values, max_size=4)
person_ids = st.text(min_size=1, max_size=30).filter(lambda s: not s.isspace()) | st.integers(
    -(10**12), 10**12
)
names = st.text(min_size=1, max_size=25).filter(lambda s: not s.isspace())
ulids = st.from_regex(r"\A[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}\Z")
timestamps = (
    st.integers(0, 10**10 - 1)
    | st.integers(0, 10**10 - 1).map(str)
    | st.integers(0, 10**10 - 1).map(float)
    | st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1))
)
catch_all = st.dictionaries(
    st.text(min_size=1, max_size=10).filter(
        lambda k: k not in {"id", "customer_id", "page", "name", "timestamp", "device_id", "platform"}
    ),
    json_values,
    max_size=5,
)
identifiers = st.one_of(
    st.fixed_dictionaries({"id": person_ids}),
    st.fixed_dictionaries({"email": names}),
    st.fixed_dictionaries({"cio_id": names}),
)


@st.composite
def split_call(
    draw: st.DrawFn, op: str, named: list[Any], extras: dict[str, Any]
) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """Spread named values between positional and keyword, dropping some trailing Nones."""
    spec = v._SPECS[op]
    n_positional = draw(st.integers(0, len(named)))
    args = tuple(named[:n_positional])
    kwargs = {
        name: value
        for index, (name, value) in enumerate(zip(spec.params, named))
        if index >= n_positional and (value is not None or index < spec.required or draw(st.booleans()))
    }
    return op, args, {**kwargs, **extras}


def send_requests(op: str, cls: type[Any]) -> st.SearchStrategy[Any]:
    message_ids = st.integers(0, 10**6) | names
    as_dict = st.fixed_dictionaries(
        {"transactional_message_id": message_ids, "identifiers": identifiers},
        optional={"message_data": data_dicts, "send_at": timestamps, "future_option": json_values},
    )
    as_object = st.builds(
        cls,
        transactional_message_id=message_ids,
        identifiers=identifiers,
        message_data=data_dicts | st.none(),
    )
    return as_dict | as_object


batch_ops = st.one_of(
    st.fixed_dictionaries(
        {
            "type": st.just("person"),
            "action": st.sampled_from(["event", "page", "screen"]),
            "identifiers": identifiers,
            "name": names,
        },
        optional={"id": ulids, "timestamp": timestamps, "attributes": data_dicts},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("person"),
            "action": st.just("merge"),
            "primary": identifiers,
            "secondary": identifiers,
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("object"),
            "action": st.sampled_from(["identify", "identify_anonymous", "delete"]),
            "identifiers": st.fixed_dictionaries({"object_type_id": st.just("1"), "object_id": names})
            | st.fixed_dictionaries({"cio_object_id": names}),
        },
        optional={"attributes": data_dicts, "timestamp": timestamps},
    ),
)


def one_arg_call(op: str) -> Any:
    return lambda value: split_call(op, [value], {})


def calls() -> st.SearchStrategy[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    opt = st.none
    strategies = [
        st.tuples(person_ids, catch_all).flatmap(lambda t: split_call("identify", [t[0]], t[1])),
        st.tuples(person_ids, names, data_dicts | opt(), ulids | opt(), timestamps | opt()).flatmap(
            lambda t: split_call("track", list(t), {})
        ),
        st.tuples(
            person_ids | st.just("") | opt(), names, data_dicts | opt(), ulids | opt(), timestamps | opt()
        ).flatmap(lambda t: split_call("track_anonymous", list(t), {})),
        st.tuples(person_ids, names, catch_all).flatmap(lambda t: split_call("pageview", [t[0], t[1]], t[2])),
        st.tuples(person_ids, names, timestamps, catch_all).flatmap(
            lambda t: split_call("backfill", list(t[:3]), t[3])
        ),
        *[person_ids.flatmap(one_arg_call(op)) for op in ("delete", "suppress", "unsuppress")],
        st.tuples(person_ids, person_ids, st.sampled_from(["ios", "android"]), catch_all).flatmap(
            lambda t: split_call("add_device", list(t[:3]), t[3])
        ),
        st.tuples(person_ids, person_ids).flatmap(lambda t: split_call("delete_device", list(t), {})),
        st.tuples(identifiers, identifiers).flatmap(
            lambda t: split_call(
                "merge_customers", [*next(iter(t[0].items())), *next(iter(t[1].items()))], {}
            )
        ),
        st.lists(batch_ops, min_size=1, max_size=4).flatmap(lambda ops: split_call("batch", [ops], {})),
        *[send_requests(op, cls).flatmap(one_arg_call(op)) for op, cls in SENDS],
    ]
    return st.one_of(strategies)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls())
def test_normalize_is_idempotent_and_json_safe(call: tuple[str, tuple[Any, ...], dict[str, Any]]) -> None:
    op, args, kwargs = call
    try:
        out = normalize(op, args, kwargs)
    except ValidationError as exc:
        # only the per-attribute size limit and dot-only path ids can trip on these generated calls
        assert exc.problem.endswith("the limit is 1000 bytes") or exc.problem == DOTS_PROBLEM, exc
        return
    out_args, out_kwargs = out
    assert len(out_args) == len(v._SPECS[op].params)
    assert not set(out_kwargs) & set(v._SPECS[op].params)
    assert normalize(op, out_args, out_kwargs) == out
    assert normalize(op, list(out_args), dict(out_kwargs)) == out
    as_json = json.dumps([list(out_args), out_kwargs], allow_nan=False)
    assert json.loads(as_json) == [list(out_args), out_kwargs]
    inspect.signature(sdk_method(op)).bind(object(), *out_args, **out_kwargs)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(OPERATIONS),
    args=st.lists(
        st.one_of(
            st.just(SECRET),
            st.just(SECRET * 9),
            st.just([SECRET, {SECRET}]),
            st.just({"k": SECRET * 3000}),
            st.integers(),
            st.none(),
        ),
        max_size=6,
    ),
    kwargs=st.dictionaries(
        st.sampled_from(["name", "data", "id", "timestamp", "request", "platform", "extra"]),
        st.just(SECRET) | st.just({SECRET}),
    ),
)
def test_no_error_message_ever_contains_a_value(op: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    try:
        normalize(op, args, kwargs)
    except ValidationError as exc:
        assert "secret" not in str(exc) and "example.com" not in str(exc)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_internal_encoder_agrees_with_json_size(value: Any) -> None:
    cleaned = v._normalise("track", "data", value)
    assert v._size("track", "data", cleaned) == json_size(cleaned)
    assert v._fast_encode(cleaned) == json.dumps(cleaned, ensure_ascii=False, separators=(",", ":"))


# ------------------------------------------------------------ ids in URL paths

DOTS_PROBLEM = "is made only of dots, which would change the request's URL path"
PATH_CALLS: dict[str, tuple[list[Any], dict[str, Any]]] = {
    "identify": (["u"], {}),
    "track": (["u", "ev"], {}),
    "pageview": (["u", "/p"], {}),
    "backfill": (["u", "ev", TS], {}),
    "delete": (["u"], {}),
    "suppress": (["u"], {}),
    "unsuppress": (["u"], {}),
    "add_device": (["u", "tok", "ios"], {}),
    "delete_device": (["u", "tok"], {}),
}


def test_every_operation_with_a_path_id_is_listed() -> None:
    assert set(PATH_CALLS) == set(v.PATH_ID_FIELDS)
    for op, fields in v.PATH_ID_FIELDS.items():
        assert set(fields) <= set(v._SPECS[op].params)


@pytest.mark.parametrize("dots", [".", "..", "...", "." * 150])
@pytest.mark.parametrize(("op", "field"), [(op, f) for op, fs in v.PATH_ID_FIELDS.items() for f in fs])
def test_ids_made_only_of_dots_are_refused_where_they_form_a_url_path(op: str, field: str, dots: str) -> None:
    args, kwargs = PATH_CALLS[op]
    bad = list(args)
    bad[v._SPECS[op].positions[field]] = dots
    fails(op, bad, kwargs, field, DOTS_PROBLEM)
    # by keyword too, and as a str subclass
    named = dict(zip(v._SPECS[op].params, args))
    named[field] = type("Sub", (str,), {})(dots)
    fails(op, [], {**named, **kwargs}, field, DOTS_PROBLEM)


@pytest.mark.parametrize("fine", ["a.b", ".hidden", "..x", "x..", "%2E%2E", "./", "a/..", " .. ", "\uff0e\uff0e"])
def test_ids_with_dots_and_other_characters_are_fine(fine: str) -> None:
    # The SDK percent-encodes "/", "%" and spaces, so none of these is a dot segment.
    assert normalize("delete_device", (fine, fine), {})[0] == (fine, fine)


def test_ids_in_bodies_may_be_dots() -> None:
    assert normalize("track_anonymous", ("..", "ev"), {})[0][0] == ".."
    assert normalize("merge_customers", ("id", "..", "id", "."), {})[0][1] == ".."
    op = {**person_event(), "identifiers": {"id": ".."}}
    assert normalize("batch", ([op],), {})[0][0][0]["identifiers"] == {"id": ".."}


# ------------------------------------------------------------ idempotency key


def test_idempotency_key_rules() -> None:
    assert v.validate_idempotency_key("track", "order-17") == "order-17"
    assert v.validate_idempotency_key("track", "k" * 150) == "k" * 150
    assert type(v.validate_idempotency_key("track", type("S", (str,), {})("x"))) is str
    cases: list[tuple[Any, str]] = [
        ("k" * 151, "is 151 bytes; the limit is 150 bytes"),
        ("é" * 76, "is 152 bytes; the limit is 150 bytes"),
        ("x" * 10_000_000, "is 10000000 bytes; the limit is 150 bytes"),
        ("", "must be a non-blank string"),
        ("  ", "must be a non-blank string"),
        (17, "is of type int; must be a non-blank string"),
        (None, "is of type NoneType; must be a non-blank string"),
        ("bad\ud800", "is not valid UTF-8 text (it holds a lone surrogate)"),
    ]
    for key, problem in cases:
        with pytest.raises(ValidationError) as info:
            v.validate_idempotency_key("track", key)
        assert (info.value.field, info.value.problem) == ("idempotency_key", problem)


@pytest.mark.parametrize(("op", "args", "field"), [
    ("identify", ["u"], "attributes.self"),
    ("pageview", ["u", "/p"], "data.self"),
    ("backfill", ["u", "ev", TS], "data.self"),
    ("add_device", ["u", "tok", "ios"], "data.self"),
])
def test_a_catch_all_name_the_task_function_cannot_take_is_refused(op: str, args: list[Any], field: str) -> None:
    fails(op, args, {"ok": 1, "self": 1}, field, v.RESERVED_NAMES["self"])
