"""``celery -A proj cio ...``: the operator's commands, reading the app's own configuration.

Exit codes: 0 done / healthy; 1 not done or not healthy (unhealthy status, nothing matched,
rows left in the spool, a refused confirmation); 2 usage error; 3 the store or the broker
could not be reached. ``--json`` prints one JSON document on stdout.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
import redis

from .breaker import Breaker
from .deadletters import DeadLetter, DeadLetters
from .fallback import Fallback
from .health import health_report
from .settings import Settings, settings_for_app
from .spool import flush_spool, spool_depth

__all__ = ["cio"]

EXIT_OK, EXIT_NOT_OK, EXIT_UNREACHABLE = 0, 1, 3
F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``90``, ``45s``, ``30m``, ``2h``, ``7d`` or ``1w`` as seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration such as 90, 30m, 2h or 7d")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def _duration(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    return None if value is None else parse_duration(value)


def _app(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    app = getattr(obj, "app", None)
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return app


def _settings(ctx: click.Context) -> Settings:
    return settings_for_app(_app(ctx))


def _fail(code: int, message: str) -> NoReturn:
    click.echo(message, err=True)
    sys.exit(code)


def guarded(fn: F) -> F:
    """Turn store and broker errors into exit code 3, naming the error type only (no URLs)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            _fail(EXIT_UNREACHABLE, f"cio: the store is unreachable ({type(exc).__name__})")
        except Exception as exc:
            if type(exc).__module__.startswith(("kombu", "amqp", "celery")):
                _fail(EXIT_UNREACHABLE, f"cio: the broker is unreachable ({type(exc).__name__})")
            raise

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _emit(as_json: bool, payload: Any, text: str) -> None:
    click.echo(json.dumps(payload, indent=2, sort_keys=True, default=str) if as_json else text)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[["-" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def _confirm(yes: bool, question: str) -> None:
    if yes:
        return
    if not sys.stdin.isatty():
        _fail(EXIT_NOT_OK, f"cio: {question} Refused: not a terminal; pass --yes to confirm.")
    if not click.confirm(question, default=False):
        _fail(EXIT_NOT_OK, "cio: nothing done.")


json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")


@click.group(name="cio")
def cio() -> None:
    """cio_celery: breaker, dead letters, fallback and spool of this app."""


# -- status ------------------------------------------------------------------------------


@cio.command()
@json_option
@click.pass_context
@guarded
def status(ctx: click.Context, as_json: bool) -> None:
    """Health: breaker, parked operations, dead letters, spool. Exit 0 healthy, 1 not, 3 no store."""
    report = health_report(_app(ctx), _settings(ctx))
    data = report.as_dict()
    b = data["breaker"] or {}
    left = "manual" if b.get("opened_by_hand") else (f"{b['time_left']:.1f}s" if b.get("time_left") else "-")
    text = "\n".join([
        f"status            {data['status']}",
        f"breaker           {b.get('state', 'disabled')} (time left {left}, trips {b.get('trips', 0)})",
        f"parked (fallback) {data['fallback_depth']}",
        f"dead letters      {data['dead_letters']}",
        f"spool (this host) {data['spool_depth']}",
        f"suppressed dups   {sum(data['suppressed_duplicates'].values())}",
        *(f"problem           {p}" for p in data["problems"]),
    ])
    _emit(as_json, data, text)
    if any(p.startswith("store unavailable") for p in report.problems):
        sys.exit(EXIT_UNREACHABLE)
    sys.exit(EXIT_OK if report.healthy else EXIT_NOT_OK)


# -- breaker -----------------------------------------------------------------------------


@cio.group()
def breaker() -> None:
    """Open, close or reset the cluster's circuit breaker by hand."""


def _breaker_change(ctx: click.Context, action: str, yes: bool, as_json: bool, duration: float | None = None) -> None:
    b = Breaker(_settings(ctx))
    before = b.status().state
    what = f"{action} the breaker" + (f" for {duration:g}s" if duration else "")
    _confirm(yes, f"{what[0].upper()}{what[1:]} (now {before}) for every worker?")
    if action == "open":
        b.open(duration)
    elif action == "close":
        b.close()
    else:
        b.reset()
    after = b.status()
    _emit(as_json, {"action": action, "before": before, "after": after.state, "trips": after.trips},
          f"breaker: {before} -> {after.state}")


@breaker.command("open")
@click.option("--for", "duration", type=float, default=None, help="Seconds; default: until closed by hand.")
@yes_option
@json_option
@click.pass_context
@guarded
def breaker_open(ctx: click.Context, duration: float | None, yes: bool, as_json: bool) -> None:
    """Open it: operations are parked until it is closed (or --for seconds)."""
    _breaker_change(ctx, "open", yes, as_json, duration)


@breaker.command("close")
@yes_option
@json_option
@click.pass_context
@guarded
def breaker_close(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Close it, forgetting the window and any half-open probes."""
    _breaker_change(ctx, "close", yes, as_json)


@breaker.command("reset")
@yes_option
@json_option
@click.pass_context
@guarded
def breaker_reset(ctx: click.Context, yes: bool, as_json: bool) -> None:
    """Close it and forget the trip count too."""
    _breaker_change(ctx, "reset", yes, as_json)


# -- dead letters --------------------------------------------------------------------------


@cio.group("dead-letters")
def dead_letters() -> None:
    """List, show, replay or purge operations that ended in dead letters."""


def _filters(f: F) -> F:
    f = click.option("--operation", help="Only this operation (track, identify, send_email ...).")(f)
    f = click.option("--older-than", callback=_duration, help="Only entries older than this (30m, 2h, 7d).")(f)
    return f


def _row(d: DeadLetter, now: float) -> list[Any]:
    return [d.id, d.operation, d.reason, d.status, d.attempts, _age(now - d.failed_at)]


@dead_letters.command("list")
@_filters
@click.option("--limit", type=int, default=100, show_default=True)
@json_option
@click.pass_context
@guarded
def dl_list(ctx: click.Context, operation: str | None, older_than: float | None, limit: int, as_json: bool) -> None:
    """Entries oldest first, without their payload. Exit 1 when none match."""
    store = DeadLetters(_settings(ctx), _app(ctx))
    entries = store.list(operation=operation, older_than=older_than, limit=limit)
    now = time.time()
    _emit(as_json, [e.summary() for e in entries],
          _table(["id", "operation", "reason", "status", "attempts", "age"], [_row(e, now) for e in entries])
          + f"\n{len(entries)} of {store.count()} dead letters")
    sys.exit(EXIT_OK if entries else EXIT_NOT_OK)


@dead_letters.command("show")
@click.argument("entry_id")
@click.option("--show-data", is_flag=True, help="Also print the arguments (customer data).")
@json_option
@click.pass_context
@guarded
def dl_show(ctx: click.Context, entry_id: str, show_data: bool, as_json: bool) -> None:
    """One entry. Its arguments are customer data: hidden unless --show-data."""
    entry = DeadLetters(_settings(ctx), _app(ctx)).get(entry_id)
    if entry is None:
        _fail(EXIT_NOT_OK, f"cio: no dead letter {entry_id}")
    data = entry.summary()
    if show_data:
        data["args"] = entry.args
        data["kwargs"] = {k: v for k, v in entry.kwargs.items() if k != "_cio"}
    else:
        data["args"] = f"<{len(entry.args)} args hidden; --show-data shows them>"
        data["kwargs"] = f"<{len([k for k in entry.kwargs if k != '_cio'])} kwargs hidden>"
    _emit(as_json, data, "\n".join(f"{k:10} {v}" for k, v in data.items()))


def _select(ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
            all_: bool) -> tuple[DeadLetters, list[DeadLetter]]:
    if not ids and operation is None and older_than is None and not all_:
        raise click.UsageError("give entry ids, --operation, --older-than, or --all")
    store = DeadLetters(_settings(ctx), _app(ctx))
    if ids:
        entries = [e for e in (store.get(i) for i in ids) if e is not None]
    else:
        entries = list(store.iter(operation, older_than))
    return store, entries


@dead_letters.command("replay")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@yes_option
@json_option
@click.pass_context
@guarded
def dl_replay(ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
              all_: bool, yes: bool, as_json: bool) -> None:
    """Enqueue entries again (same idempotency key and event id). Exit 1 when none match."""
    store, entries = _select(ctx, ids, operation, older_than, all_)
    if not entries:
        _fail(EXIT_NOT_OK, "cio: no dead letter matches")
    _confirm(yes, f"Replay {len(entries)} dead letters?")
    done = store.replay(ids=[e.id for e in entries])
    _emit(as_json, {"replayed": done}, f"replayed {done} dead letters")


@dead_letters.command("purge")
@click.argument("ids", nargs=-1)
@_filters
@click.option("--all", "all_", is_flag=True, help="Every dead letter.")
@yes_option
@json_option
@click.pass_context
@guarded
def dl_purge(ctx: click.Context, ids: tuple[str, ...], operation: str | None, older_than: float | None,
             all_: bool, yes: bool, as_json: bool) -> None:
    """Delete entries for good. Exit 1 when none match."""
    store, entries = _select(ctx, ids, operation, older_than, all_)
    if not entries:
        _fail(EXIT_NOT_OK, "cio: no dead letter matches")
    _confirm(yes, f"Delete {len(entries)} dead letters for good?")
    done = sum(1 for e in entries if store.delete(e.id))
    _emit(as_json, {"purged": done}, f"purged {done} dead letters")


# -- fallback and spool -------------------------------------------------------------------


@cio.group()
def fallback() -> None:
    """The operations parked while the breaker was open."""


@fallback.command("release")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--force", is_flag=True, help="Release even though the breaker is not closed.")
@json_option
@click.pass_context
@guarded
def fallback_release(ctx: click.Context, limit: int, force: bool, as_json: bool) -> None:
    """Publish up to --limit parked operations now (batched when batch_drain is on)."""
    settings = _settings(ctx)
    state = Breaker(settings).status().state if settings.breaker_enabled else "closed"
    if state != "closed" and not force:
        _fail(EXIT_NOT_OK, f"cio: the breaker is {state}; released operations would be parked again "
                           "(close it first, or --force)")
    fb = Fallback(settings, _app(ctx))
    done = fb.release(limit, batch=settings.batch_drain)
    _emit(as_json, {"released": done, "remaining": fb.depth()},
          f"released {done} parked operations; {fb.depth()} remain")


@cio.group()
def spool() -> None:
    """This host's local enqueue spool (operations the broker could not take)."""


@spool.command("flush")
@json_option
@click.pass_context
@guarded
def spool_flush(ctx: click.Context, as_json: bool) -> None:
    """Publish the spool to the broker now. Exit 1 if anything remains, 3 if the broker is down."""
    app = _app(ctx)
    if spool_depth(app) == 0:
        _emit(as_json, {"published": 0, "remaining": 0}, "the spool is empty")
        return
    try:
        result = flush_spool(app)
    except Exception as exc:  # noqa: BLE001 - whatever the transport raises: the broker is down
        _fail(EXIT_UNREACHABLE, f"cio: the broker is unreachable ({type(exc).__name__}); the spool is kept")
    _emit(as_json, {"published": result.published, "remaining": result.remaining},
          f"published {result.published}; {result.remaining} remain")
    sys.exit(EXIT_OK if result.remaining == 0 else EXIT_NOT_OK)
